#!/usr/bin/env bash
# The test suite: unit tests (no MPI), then the multi-rank tests under mpiexec (MPICH),
# the SLURM tests (a real one-node cluster on loopback, and a two-node one made of network
# namespaces: as root, where slurm-wlm and munge are installed or ELFISH_SLURM_TESTS=1 lets
# them be installed; skipped otherwise; ELFISH_SLURM_2NODE=0 skips the two-node one), then the
# multi-rank tests again under Debian's Open MPI when it can be had (ELFISH_TEST_OPENMPI=0
# skips that). Sets up .venv on first use (launch/setup.sh).
# ELFISH_TEST_RANKS picks the MPI size (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source "${ELFISH_VENV:-.venv}/bin/activate"
ranks=${ELFISH_TEST_RANKS:-3}
echo "== unit tests"
python -m pytest -p no:cacheprovider tests/unit
echo "== MPI tests on $ranks ranks, $(python -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])')"
# pytest-timeout ends a hung test inside the job; the outer timeout is the last guard.
timeout 1200 mpiexec -n "$ranks" python -m pytest -p no:cacheprovider -q --with-mpi tests/mpi
# (with three or more workers the reduce transport sums in an order of MPI's choosing)
echo "== determinism, exact resume and the reduce transport on $((ranks + 1)) ranks"
timeout 600 mpiexec -n "$((ranks + 1))" python -m pytest -p no:cacheprovider -q --with-mpi tests/mpi/test_train.py \
    -k "same_seed or untrained or reduce_transport"
echo "== SLURM tests"
python -m pytest -p no:cacheprovider -rs tests/slurm
deactivate
if [ "${ELFISH_TEST_OPENMPI:-1}" != 0 ] && bash launch/setup-openmpi.sh; then
    echo "== MPI tests on $ranks ranks, Open MPI"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 1200 \
        /usr/bin/mpiexec.openmpi --oversubscribe -n "$ranks" \
        "${ELFISH_OPENMPI_VENV:-.venv-openmpi}/bin/python" -m pytest -p no:cacheprovider -q --with-mpi tests/mpi
    echo "== under Open MPI: a killed worker is named; a usage error is printed once without the launcher's rank variable"
    ELFISH_OPENMPI_PYTHON="${ELFISH_OPENMPI_VENV:-.venv-openmpi}/bin/python" \
        "${ELFISH_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider -q -rs tests/unit/test_faults.py \
        tests/unit/test_resume_safety.py -k "killed_worker_ends or without_the_launchers_rank_variable"
elif [ "${ELFISH_TEST_OPENMPI:-1}" != 0 ]; then
    echo "== Open MPI not available here: its MPI test pass is skipped"
fi
