#!/usr/bin/env bash
# QAT of the default model (Gemma 3 270M) to Q4_0 on a 2-core CPU with qatkit run's default recipe,
# measured against llama.cpp's own PTQ in llama.cpp on every domain of the held-out suite.
# Figures and wall times: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/qat_vs_ptq.py --steps 150 --out runs/cpu_15min "$@"   # the defaults of qatkit run
