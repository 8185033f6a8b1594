"""Cost of fake-quant in a QAT training step on the default model, measured side by side.

Three students of Gemma 3 270M train the same batches with the same loss (qatkit's distill_loss,
KL on 25% of positions, batch 1 x 256) and AdamW, alternated step by step in one process:
- plain:   no fake-quant (the same FakeQuantLinear modules, switched off);
- qatkit:  Q4_0 fake-quant of the 126 decoder linears (the exact ggml grid);
- torchao: torchao's QATConfig with int4 group-32 symmetric fake-quant on the same linears
           (its own grid, which does not export to GGUF Q4_0).
Prints the median step time of each and the ratios.

    pip install torchao==0.18.0   # only for the torchao column
    python benchmarks/qat_overhead.py [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qatkit.models.load import load, resolve
from qatkit.nn import FakeQuantLinear
from qatkit.prepare import QATConfig, prepare
from qatkit.train.data import default_train_texts, pack
from qatkit.train.loop import TrainConfig, distill_loss, positions


def torchao_student(teacher):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat import QATConfig as AOQATConfig

    student = copy.deepcopy(teacher)
    cfg = AOQATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True), step="prepare")
    # a filter matching the root module silently does nothing (FACTS.md): filter on Linear
    quantize_(student.model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    student.get_input_embeddings().weight.requires_grad_(False)
    return student


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed steps per student (after one warm-up step)")
    args = ap.parse_args()
    source = resolve("gemma3-270m")
    teacher, tokenizer = load(source)
    teacher.requires_grad_(False)
    cfg = TrainConfig(seq_len=256, kl_positions=0.25)
    seqs = pack(tokenizer, default_train_texts()[:2], cfg.seq_len, teacher.config.vocab_size)

    plain = copy.deepcopy(teacher)
    prepare(plain, source.arch, QATConfig())
    for m in plain.modules():
        if isinstance(m, FakeQuantLinear):
            m.enabled = False
    ours = copy.deepcopy(teacher)
    prepare(ours, source.arch, QATConfig())
    students = {"plain": plain, "qatkit Q4_0": ours}
    try:
        students["torchao int4 g32"] = torchao_student(teacher)
    except ImportError:
        print("torchao not installed: pip install torchao==0.18.0 for its column")
    for s in students.values():
        s.train().requires_grad_(True)
        s.get_input_embeddings().weight.requires_grad_(False)
    opts = {k: torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-6) for k, s in students.items()}
    times: dict[str, list[float]] = {k: [] for k in students}
    for step in range(args.steps + 1):
        x = seqs[step : step + 1]
        pos = positions(cfg.seq_len, cfg.kl_positions, torch.Generator().manual_seed(step))
        for name, s in students.items():
            t = time.perf_counter()
            loss, _ = distill_loss(s, teacher, x, pos, cfg)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if step:  # the first step warms up allocators and JIT caches
                times[name].append(time.perf_counter() - t)
    print(f"Gemma 3 270M, batch 1 x {cfg.seq_len}, KL on {cfg.kl_positions:.0%} of positions, {torch.get_num_threads()} threads; median of {args.steps} alternated steps")
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<18} {m:6.2f} s/step   {m / base:5.3f}x plain")


if __name__ == "__main__":
    main()
