#!/usr/bin/env bash
# QAT of a Gemma 4 checkpoint you bring (E2B or E4B; the 26B-A4B MoE and the 12B "unified" take the
# same command on a larger device) on one CUDA GPU, exported as a Q4_0 GGUF for llama.cpp and scored
# there against llama.cpp's own PTQ on the held-out suite.
#
#   bash recipes/gemma4_qat.sh /path/to/gemma-4-E2B-it [--steps N ...]
#
# MODEL is the Hugging Face directory as Google ships it (Gemma4ForConditionalGeneration, sharded
# bf16 safetensors): qatkit strips the vision and audio towers once (cached) and trains the text
# decoder in float32. Both embedding tables (the token embedding and the 2.35B-entry per-layer
# table) stay frozen at their Q6_K values, as llama-quantize stores them; every Linear trains
# through the exact Q4_0 quantizer; the MoE experts of the 26B too.
# Before loading anything qatkit prints its memory estimate and refuses a GPU that cannot hold it.
# With the settings below it estimates ~67 GB for E2B (weights of teacher and student 37.0 GB,
# gradients and AdamW of the 1.88B trainable weights 22.5 GB, AdamW's step 7.5 GB; activations
# 1.0 GB with gradient checkpointing): an 80 GB A100/H100. E4B: ~123 GB (a 141 GB H200). Without
# --grad-checkpointing E2B needs ~93 GB. --teacher-dtype bfloat16 takes 9 GB (E2B) / 15 GB (E4B)
# off; several GPUs: recipes/fsdp_qat.sh. Print the table: qatkit train MODEL --dry-run [options].
# Not run here: Gemma 4 weights cannot be downloaded on these machines. What was verified is on
# tiny random Gemma 4 models (tests/test_gemma4.py): files equal to llama.cpp's converter's and
# quantizer's, and an export gap at float noise after QAT.
#   Bring your own CUDA torch first: python3 -m venv .venv && .venv/bin/pip install torch
#   (setup.sh then keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bash recipes/gemma4_qat.sh MODEL_DIR [qatkit run options]}
shift
bash scripts/setup.sh
.venv/bin/qatkit run --model "$MODEL" --format q4_0 --steps 1000 --batch-size 4 --seq-len 512 --kl-positions 0.5 \
  --grad-checkpointing --lr 1e-5 --eval-every 100 --ckpt-every 250 --chunks 8 --out runs/gemma4_qat "$@"
