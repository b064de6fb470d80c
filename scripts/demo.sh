#!/usr/bin/env bash
# The README's main command: builds .venv (core + hf, eval, plot extras) and runs `lynx demo`
# on the embedded reference model. Extra arguments go to `lynx demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh" hf,eval,plot,dev
cd "$root"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/lynx demo "$@"
