#!/usr/bin/env bash
# A short ELFISH run: 4 workers on Fashion-MNIST, one of them a 4x straggler (sleep throttle).
# Sets up .venv on first use (launch/setup.sh). Extra arguments go to `elfish-mpi train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source "${ELFISH_VENV:-.venv}/bin/activate"
out=${ELFISH_OUT:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
exec mpiexec -n 5 elfish-mpi train --config launch/configs/quickstart.toml --out "$out" "$@"
