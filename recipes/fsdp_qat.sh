#!/usr/bin/env bash
# QAT on N GPUs of one machine with PyTorch's FSDP2 (torchrun), exported as a Q4_0 GGUF, then scored
# in llama.cpp against llama.cpp's own PTQ of the same model on the held-out suite.
#
#   bash recipes/fsdp_qat.sh MODEL N_GPUS [qatkit train options]
#
# MODEL: a Hugging Face directory (a Gemma 4 checkpoint as Google ships it, stripped to its text
# decoder once and cached), a GGUF, or gemma3-270m. Student and teacher are sharded layer by layer;
# the frozen per-layer table of Gemma 4 E2B/E4B is split by rows; --batch-size is the global
# micro-batch (a multiple of N). Checkpoints are sharded (RUN/checkpoint/step-*), written by every
# GPU at once, and resume at any number of GPUs (a one-GPU run included): add --resume.
# First it prints the predicted memory per GPU (qatkit train --dry-run): E2B with these settings,
# ~11 GB per GPU on 8 GPUs (bfloat16 teacher), ~61 GB on one; E4B ~19 GB on 8; 26B-A4B ~75 GB on
# 8 (benchmarks/RESULTS.md, "Memory"). Not run here: these machines have no GPUs and Gemma 4
# weights cannot be downloaded; the same code path runs in CI on 2 CPU processes (gloo) and equals
# one process (tests/test_distributed.py).
#   Bring your own CUDA torch first: python3 -m venv .venv && .venv/bin/pip install torch
#   (setup.sh then keeps it). Several machines: torchrun --nnodes M --node-rank I --rdzv-endpoint HOST:PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bash recipes/fsdp_qat.sh MODEL N_GPUS [qatkit train options]}
N=${2:?usage: bash recipes/fsdp_qat.sh MODEL N_GPUS [qatkit train options]}
shift 2
OUT=runs/fsdp_qat
bash scripts/setup.sh
SETTINGS=(--format q4_0 --steps 1000 --batch-size 8 --seq-len 512 --kl-positions 0.5 --grad-checkpointing --teacher-dtype bfloat16
          --lr 1e-5 --eval-every 100 --ckpt-every 100)
.venv/bin/qatkit train "$MODEL" --dry-run --world-size "$N" "${SETTINGS[@]}" "$@"
.venv/bin/torchrun --standalone --nproc-per-node "$N" -m qatkit.cli train "$MODEL" --out "$OUT" --export "${SETTINGS[@]}" "$@"
.venv/bin/qatkit export "$MODEL" --format f32 --out "$OUT/teacher-f32.gguf"
.venv/bin/qatkit export "$MODEL" --format q4_0 --ptq llama.cpp --out "$OUT/llama-ptq-q4_0.gguf"
.venv/bin/qatkit eval "$OUT/qat-q4_0.gguf" "$OUT/llama-ptq-q4_0.gguf" --ref "$OUT/teacher-f32.gguf" --chunks 8
