#!/usr/bin/env bash
# One command for a bare GPU machine: all of dpprims' GPU evidence inside 8 minutes of wall time
# (tests, kernel timings, CLI training, the end-to-end table), written to $OUT. bench/README.md
# gives the device call; bench/gpu_check.py does the work (this wrapper only fixes the folder,
# the interpreter and unbuffered output). Extra arguments go to gpu_check.py (--budget, --skip).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
exec "$PY" bench/gpu_check.py --out "${OUT:-bench/results}" "$@"
