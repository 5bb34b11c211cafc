#!/usr/bin/env bash
# On a machine with CUDA: install what is needed, run the CUDA-path checks (mixed batches of prefix,
# LoRA and prefix+LoRA rows vs each row alone at bf16 tolerances, multi-user LoRA/PT-PEFT training
# vs alone) and `steer bench serve|lora|train` on the GPU, and write one JSON report.
#   bash scripts/gpu-check.sh [report.json]        (about 5 minutes on one GPU after the install)
# Extra arguments go to scripts/gpu_check.py, e.g. `--device cpu --dtype float32 --quick` for a smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/venv.sh
. scripts/lib/venv.sh
ensure_venv ""   # PyPI's torch 2.13.0 for Linux x86_64 is the CUDA build
out="${1:-gpu-report.json}"
shift || true
python -c 'import torch; print("[steer] cuda:", torch.cuda.is_available(), torch.version.cuda)' >&2
python scripts/gpu_check.py --out "$out" "$@"
