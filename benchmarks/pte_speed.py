"""Prefill and decode speed of ExecuTorch programs, side by side through ExecuTorch's LLM runner.

Each round generates 64 greedy tokens from the same prompt with every file in turn (these
machines are noisy: alternating spreads the noise over all files alike); prints the median
tokens/s per file and each ratio to the first file.

    python benchmarks/pte_speed.py A.pte B.pte ... [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from qatkit.runtime.executorch import generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    speeds = {f: {"prefill": [], "decode": []} for f in args.files}
    for r in range(args.rounds + 1):
        for f in args.files:
            out = generate(f, "The capital of France is", n_tokens=args.tokens)
            if r:  # the first round loads caches and pages
                speeds[f]["prefill"].append(out["prefill_token_per_sec"])
                speeds[f]["decode"].append(out["decode_token_per_sec"])
    print(f"{torch.get_num_threads()} threads; median of {args.rounds} alternated rounds of {args.tokens} tokens")
    base = statistics.median(speeds[args.files[0]]["decode"])
    for f in args.files:
        p, d = (statistics.median(speeds[f][k]) for k in ("prefill", "decode"))
        print(f"  {str(f):<48} {f.stat().st_size / 1e6:7.1f} MB  prefill {p:7.1f} tok/s  decode {d:6.1f} tok/s  ({d / base:.2f}x the first)")


if __name__ == "__main__":
    main()
