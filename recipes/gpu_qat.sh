#!/usr/bin/env bash
# A longer QAT run of the default model for one CUDA GPU (aiming at >= 85% gap closure): 2,000
# steps of 8 x 512 tokens (~8M tokens), KL on every position. The trainer picks CUDA by itself and
# stays in float32 (bf16 would round the fake-quantized weights; see qatkit/train/loop.py).
# Not yet run on a GPU: no figures from it are recorded. Mind the data: the default training text
# is ~75k tokens (291 sequences of 256), so 8M tokens are ~110 passes over it; give more text
# with --data (files, folders, .jsonl) for a run this long, and --teacher-topk K makes every pass
# after the first skip the teacher (the loss is then the top-K + rest KL, untested at this length).
#   Bring your own CUDA torch first: python3 -m venv .venv && .venv/bin/pip install torch
#   (setup.sh then keeps it), then: bash recipes/gpu_qat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/qat_vs_ptq.py --steps 2000 --batch-size 8 --seq-len 512 --kl-positions 1.0 \
  --lr 2e-5 --chunks 32 --out runs/gpu_qat "$@"
