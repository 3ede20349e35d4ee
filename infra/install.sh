#!/usr/bin/env bash
# Install FaceFoundry into a virtual environment with the pinned torch builds.
# Usage: infra/install.sh [VENV] [EXTRAS]   e.g. infra/install.sh .venv all,dev
set -euo pipefail
venv=${1:-.venv}
extras=${2:-all}
here="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -c "$here/constraints.txt" "setuptools<81" wheel
"$venv/bin/python" -m pip install -c "$here/constraints.txt" -e "$here[$extras]"
echo "installed: $("$venv/bin/facefoundry" --help >/dev/null && echo facefoundry OK)"
