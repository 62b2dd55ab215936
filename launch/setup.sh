#!/usr/bin/env bash
# Prepare a machine for elfish-mpi: system packages (when run as root on Debian/Ubuntu)
# and a virtual environment in .venv with the project, its test extras and the MPICH wheel.
# Idempotent: a second run only re-installs when setup.py changed.
#
#   TORCH_SPEC   the torch requirement to install first (default torch==2.13.0, the CPU
#                build here; on a GPU cluster install your site's build and set TORCH_SPEC="")
#   ELFISH_VENV  where the environment lives (default: .venv in the repository)
#   ELFISH_EXTRAS  pip extras (default: test,mpich; use "test" on a cluster with its own MPI)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
VENV=${ELFISH_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
EXTRAS=${ELFISH_EXTRAS:-test,mpich}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    for pkg in dataset-fashion-mnist hdf5-tools; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup: installing ${need[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
            || echo "setup: warning: could not install ${need[*]} (Fashion-MNIST must then be given with data.path)" >&2
    fi
fi

stamp="$VENV/.elfish-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pipq "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "$TORCH_SPEC" ]; then
    pipq "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
pipq "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
touch "$stamp"
echo "setup: environment ready in $VENV"
