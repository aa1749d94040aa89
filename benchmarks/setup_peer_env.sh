#!/usr/bin/env bash
# Create (or update) the separate venv for the anomalib peer baseline, benchmarks/peer_anomalib.py.
#
#   bash benchmarks/setup_peer_env.sh [VENV_PATH]     # default: .peer-venv at the repository root
#
# anomalib is never installed into twostage_ad's own environment. Idempotent: an existing venv is
# reused, and pip only installs what is missing or at another version than the pins in
# benchmarks/peer_requirements.txt (one pip command, so torch/torchvision stay at their pins).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${1:-$repo/.peer-venv}"
requirements="$here/peer_requirements.txt"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv $venv"
    "$python" -m venv "$venv"
fi

if "$venv/bin/python" - "$requirements" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
pins = [line.split("#")[0].strip() for line in open(sys.argv[1])]
ok = True
for pin in filter(None, pins):
    name, wanted = pin.split("==")
    try:
        ok &= version(name) == wanted
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PY
then
    echo "peer venv $venv already has the pinned packages"
else
    "$venv/bin/python" -m pip install -r "$requirements"
fi

"$venv/bin/python" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import anomalib, lightning, sklearn, torch, torchvision
from anomalib.models import Ganomaly  # noqa: F401
print(f"peer venv ok: anomalib {anomalib.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, lightning {lightning.__version__}, scikit-learn {sklearn.__version__}")
PY
echo "run: $venv/bin/python benchmarks/peer_anomalib.py --help"
