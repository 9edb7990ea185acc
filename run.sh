#!/usr/bin/env bash
# One command from a fresh clone to a running server: installs swiftlm (CPU torch pin unless torch is already
# installed, e.g. a CUDA build) and starts `swiftlm serve` with any arguments given (no --model: the demo model).
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import swiftlm, fastapi" 2>/dev/null || python3 -m pip install -q -e .
exec python3 -m swiftlm serve "$@"
