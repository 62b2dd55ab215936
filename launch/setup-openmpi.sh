#!/usr/bin/env bash
# A second environment, .venv-openmpi, on Debian's Open MPI: Debian's python3-mpi4py (built
# against openmpi-bin / libopenmpi-dev) seen through a virtual environment of the system
# Python, plus torch and the project. The MPI tests run in it under mpiexec.openmpi.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
VENV=${ELFISH_OPENMPI_VENV:-.venv-openmpi}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    for pkg in openmpi-bin libopenmpi-dev python3-mpi4py python3-venv; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup-openmpi: installing ${need[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi
if [ ! -x /usr/bin/mpiexec.openmpi ] || ! /usr/bin/python3 -c "import mpi4py" 2>/dev/null; then
    echo "setup-openmpi: needs Debian's openmpi-bin and python3-mpi4py" >&2
    exit 1
fi
stamp="$VENV/.elfish-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
if [ -n "$TORCH_SPEC" ]; then
    pipq "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
pipq "$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" - <<'PY'
from mpi4py import MPI
lib = MPI.Get_library_version()
assert "Open MPI" in lib, f"mpi4py in this environment is not on Open MPI: {lib[:60]}"
PY
touch "$stamp"
echo "setup-openmpi: environment ready in $VENV"
