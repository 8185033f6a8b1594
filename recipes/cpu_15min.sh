#!/usr/bin/env bash
# QAT of the default model (Gemma 3 270M) to Q4_0 on a 2-core CPU in about 15 minutes of
# training, measured against llama.cpp's own PTQ in llama.cpp. Figures: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/qat_vs_ptq.py --steps 150 --lr 2e-5 --out runs/cpu_15min "$@"
