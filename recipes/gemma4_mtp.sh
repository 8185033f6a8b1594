#!/usr/bin/env bash
# QAT of Gemma 4's MTP drafter ("assistant") against the quantized target you will serve, on one
# CUDA GPU, then speculative decoding with it in llama.cpp beside plain decoding of the target.
#
#   bash recipes/gemma4_mtp.sh TARGET.gguf ASSISTANT_DIR [qatkit drafter options]
#
# TARGET.gguf: the Gemma 4 Q4_0 file the drafter will serve: qatkit's QAT file
# (runs/gemma4_qat/train/qat-q4_0.gguf from recipes/gemma4_qat.sh) or a PTQ one (qatkit export
# MODEL --format q4_0). ASSISTANT_DIR: the drafter as Google ships it beside the checkpoint
# (Gemma4AssistantForCausalLM, e.g. the E2B assistant: hidden 256, 4 layers). The target is read
# with its file's numbers and frozen; the drafter trains through the exact Q4_0 quantizer on the
# default training text, every drafting position of a sequence at once, 2 draft steps deep, and
# is written as RUN_DIR/qat-drafter-q4_0.gguf. Its centroid head (masked_embedding) is not in
# the GGUF, as llama.cpp's converter leaves it out: llama.cpp drafts from the whole vocabulary.
# Not run here: Gemma 4 weights cannot be downloaded on these machines. Verified on tiny random
# models (tests/test_drafter.py, tests/test_mtp.py, benchmarks/mtp.py).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:?usage: bash recipes/gemma4_mtp.sh TARGET.gguf ASSISTANT_DIR [qatkit drafter options]}
ASSISTANT=${2:?usage: bash recipes/gemma4_mtp.sh TARGET.gguf ASSISTANT_DIR [qatkit drafter options]}
shift 2
bash scripts/setup.sh
.venv/bin/qatkit drafter "$ASSISTANT" --target "$TARGET" --steps 2000 --seq-len 1024 --lr 1e-5 --ckpt-every 250 --out runs/gemma4_mtp "$@"
.venv/bin/qatkit export "$ASSISTANT" --format q4_0 --out runs/gemma4_mtp/ptq-drafter-q4_0.gguf
.venv/bin/python - "$TARGET" runs/gemma4_mtp <<'PY'
import sys
from llama_cpp import Llama
from qatkit.runtime import mtp
target, run = sys.argv[1], sys.argv[2]
tok = Llama(target, vocab_only=True, verbose=False)
prompts = ["Explain how a hash table handles collisions.", "Write a short story about a lighthouse keeper.",
           "What are the main causes of inflation?", "def fibonacci(n):"]
for label, drafter in (("PTQ drafter", f"{run}/ptq-drafter-q4_0.gguf"), ("QAT drafter", f"{run}/qat-drafter-q4_0.gguf")):
    acc = drafted = steps = tokens = 0
    for p in prompts:
        ids = tok.tokenize(p.encode(), add_bos=True)
        r = mtp.speculative_greedy(target, drafter, ids, 128, n_draft=4)
        g = mtp.plain_greedy(target, ids, 128)
        acc, drafted, steps, tokens = acc + r["accepted"], drafted + r["drafted"], steps + r["target_steps"], tokens + r["n_tokens"]
        print(f"{label}: {r['tokens_per_s']:.1f} tok/s speculative vs {g['tokens_per_s']:.1f} plain")
    print(f"{label}: {acc / drafted:.1%} of drafts accepted, {tokens / steps:.2f} tokens per target step")
PY
