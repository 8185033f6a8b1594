"""What a bfloat16 teacher (`--teacher-dtype bfloat16`) does to the distillation target.

The teacher is never exported, so its precision only moves the target the student is pulled
toward. On the default model (Gemma 3 270M) and sequences of each held-out domain (text unlike
the training text), this prints the KL between the float32 teacher and the same teacher in
bfloat16, and, for scale, the KL between the float32 teacher and its Q4_0 PTQ student (the gap
QAT trains to close): the share of the quantization gap that the target itself moves.

    python benchmarks/bf16_teacher.py [--seqs 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import copy

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=4, help="sequences of each domain")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    from qatkit import quiet_import_noise

    quiet_import_noise()
    from qatkit.config import QATConfig
    from qatkit.eval.suite import load_suite
    from qatkit.metrics import compare
    from qatkit.models.load import load, resolve
    from qatkit.prepare import prepare
    from qatkit.train.data import pack
    from qatkit.train.loop import logits_at

    source = resolve("gemma3-270m")
    teacher, tokenizer = load(source)
    ptq = copy.deepcopy(teacher)
    prepare(ptq, source.arch, QATConfig())  # the Q4_0 student before any training: PTQ
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    print(f"Gemma 3 270M, {args.seqs} x {args.seq_len} tokens of each held-out domain; KL(float32 teacher || other), every position")
    print(f"{'domain':<10} {'KL bf16 teacher':>16} {'same top':>9} {'KL Q4_0 PTQ':>12} {'bf16 / PTQ':>11}")
    sums = {"bf16": 0.0, "ptq": 0.0}
    suite = {k: v for k, v in load_suite().items() if k != "docs"}  # docs is in-domain for the default training text
    with torch.no_grad():
        for domain, text in suite.items():
            seqs = pack(tokenizer, [text], args.seq_len, vocab_size=teacher.config.vocab_size)[: args.seqs]
            pos = torch.arange(args.seq_len - 1)
            ref = torch.cat([logits_at(teacher, s[None], pos)[0] for s in seqs])
            half = compare(ref, torch.cat([logits_at(bf16, s[None], pos)[0] for s in seqs]))
            q = compare(ref, torch.cat([logits_at(ptq, s[None], pos)[0] for s in seqs]))
            sums["bf16"] += half["kld"] / len(suite)
            sums["ptq"] += q["kld"] / len(suite)
            print(f"{domain:<10} {half['kld']:>16.2e} {half['same_top']:>8.2f}% {q['kld']:>12.4f} {half['kld'] / q['kld']:>10.2%}")
    print(f"{'mean':<10} {sums['bf16']:>16.2e} {'':>9} {sums['ptq']:>12.4f} {sums['bf16'] / sums['ptq']:>10.2%}")


if __name__ == "__main__":
    main()
