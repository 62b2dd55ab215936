#!/usr/bin/env bash
# The test suite: unit tests (no MPI), then the multi-rank tests under mpiexec.
# Sets up .venv on first use (launch/setup.sh). ELFISH_TEST_RANKS picks the MPI size (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source "${ELFISH_VENV:-.venv}/bin/activate"
ranks=${ELFISH_TEST_RANKS:-3}
echo "== unit tests"
python -m pytest -p no:cacheprovider tests/unit
echo "== MPI tests on $ranks ranks"
# pytest-timeout ends a hung test inside the job; the outer timeout is the last guard.
timeout 1200 mpiexec -n "$ranks" python -m pytest -p no:cacheprovider -q --with-mpi tests/mpi
