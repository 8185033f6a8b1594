"""What checkpoints cost a QAT run of the default model, side by side in one process.

The same student (Gemma 3 270M, Q4_0 fake-quant, qatkit's defaults but batch 1 x 256) trains the
same steps three times from the same start: without checkpoints (one at the end, which every run
writes), with a checkpoint every `--every` steps written in the background (qatkit's
CheckpointWriter), and with the same checkpoints written in the step loop (what qatkit did
before). Prints each run's wall time, the cost per checkpoint, and that cost as a share of
training time at qatkit's default interval (50 steps).

    python benchmarks/checkpoint_cost.py [--steps 20] [--every 5]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args()

    from qatkit.models.load import load, resolve
    from qatkit.prepare import QATConfig, prepare
    from qatkit.train import loop
    from qatkit.train.data import default_train_texts, pack

    source = resolve("gemma3-270m")
    teacher, tokenizer = load(source)
    cfg = loop.TrainConfig(steps=args.steps, batch_size=1, seq_len=256, kl_positions=0.25, eval_every=10**6, ckpt_every=args.every)
    train_seqs = pack(tokenizer, default_train_texts(), cfg.seq_len, teacher.config.vocab_size)[: 4 * args.steps]
    student0 = copy.deepcopy(teacher)
    prepare(student0, source.arch, QATConfig())

    class InLoop(loop.CheckpointWriter):  # the old way: the loop waits for every write
        def save(self, path, state):
            loop.write_checkpoint(path, state)

    runs = {"no checkpoints": (10**6, loop.CheckpointWriter), "background": (args.every, loop.CheckpointWriter), "in the loop": (args.every, InLoop)}
    seconds, size = {}, 0
    with tempfile.TemporaryDirectory() as d:
        for name, (every, writer) in runs.items():
            loop.CheckpointWriter, real = writer, loop.CheckpointWriter
            student = copy.deepcopy(student0)
            t0 = time.perf_counter()
            loop.train(student, teacher, train_seqs, None, loop.TrainConfig(**{**cfg.__dict__, "ckpt_every": every}), Path(d) / name.replace(" ", "_"), progress=False, device=torch.device("cpu"))
            seconds[name] = time.perf_counter() - t0
            loop.CheckpointWriter = real
            size = (Path(d) / name.replace(" ", "_") / "checkpoint.pt").stat().st_size
    n_ckpt = args.steps // args.every - 1  # beyond the final one, which every run writes
    step_s = seconds["no checkpoints"] / args.steps
    print(f"Gemma 3 270M, Q4_0 QAT, batch 1 x 256, {args.steps} steps, a checkpoint of {size / 1e9:.2f} GB every {args.every} steps")
    print(f"{'run':<16} {'seconds':>8} {'per checkpoint s':>17} {'share at every 50 steps':>24}")
    for name, s in seconds.items():
        per = (s - seconds["no checkpoints"]) / n_ckpt if name != "no checkpoints" else 0.0
        print(f"{name:<16} {s:8.1f} {per:17.2f} {per / (50 * step_s + per):23.1%}")
    print(f"(a step takes {step_s:.2f} s without checkpoints; target: checkpoints <= 5% of training time at the default interval)")


if __name__ == "__main__":
    main()
