"""What QAT costs on Gemma 4's shapes, against plain fine-tuning of the same model, side by side.

Two random Gemma 4 models, small enough for a CPU but with the real shapes' parts (tests/tiny_models):
- E-style: per-layer embeddings (frozen, like the token embedding), K/V sharing, double-wide MLP;
- MoE (26B-style): 8 experts, top 2, as 3-D Parameters beside the dense MLP; K = V.
Each runs qatkit's own training loop (distillation from its float copy, KL on every position,
AdamW) in a fresh process, twice: QAT (Q4_0 fake-quant of every Linear and of the 3-D experts)
and plain fine-tuning (the same student with fake-quant switched off for the whole run:
--fq-warmup past the last step). Printed per model: median step time, peak RSS of the process,
their QAT / plain ratios, and the cost of fake-quantizing the 3-D experts once (as each forward
does), as a share of a QAT step.

    python benchmarks/gemma4_qat_cost.py [--steps 12] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(shape: str, mode: str, steps: int, hidden: int) -> dict:
    import copy

    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    from qatkit.config import QATConfig, TrainConfig
    from qatkit.formats import get
    from qatkit.models.arch import arch_for_config
    from qatkit.prepare import prepare
    from qatkit.train.loop import train
    from tiny_models import TEXT, tiny_gemma4

    torch.manual_seed(0)
    extra = {"num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": hidden} if shape == "moe" else {"hidden_size_per_layer_input": 64}
    teacher = tiny_gemma4(shape=shape, vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, head_dim=64, global_head_dim=128, **extra)
    student = copy.deepcopy(teacher)
    prepare(student, arch_for_config(teacher.config), QATConfig())
    seq = 256
    ids = torch.tensor([ord(c) % 4000 + 4 for c in TEXT * 40])
    seqs = ids[: (len(ids) // seq) * seq].reshape(-1, seq)
    cfg = TrainConfig(steps=steps, batch_size=1, seq_len=seq, lr=1e-5, kl_positions=1.0, eval_every=10_000, ckpt_every=10_000,
                      fq_warmup=steps + 1 if mode == "plain" else 0)
    with tempfile.TemporaryDirectory() as d:
        rows = train(student, teacher, seqs[:-2], seqs[-2:], cfg, Path(d), progress=False)
    times = [seq / r["tokens_per_s"] for r in rows if r["step"] >= 2]  # the first steps warm the allocator up
    out = {"step_s": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
           "trainable_m": sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6}
    if shape == "moe" and mode == "qat":
        experts = [getattr(m, n) for m in student.modules() if hasattr(m, "qat") for n in ("gate_up_proj", "down_proj")]
        t0 = time.perf_counter()
        for _ in range(5):
            with torch.no_grad():
                for w in experts:
                    get("q4_0").fake_quant(w)
        out["experts_fq_s"] = (time.perf_counter() - t0) / 5
        out["experts_m"] = sum(w.numel() for w in experts) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.hidden)))
        return
    results = {}
    for shape in ("e", "moe"):
        for mode in ("plain", "qat"):
            cmd = [sys.executable, __file__, "--child", shape, mode, "--steps", str(args.steps), "--hidden", str(args.hidden)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[shape, mode] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{'model':<8} {'params M':>8} {'trainable M':>11} {'plain s/step':>12} {'QAT s/step':>10} {'time x':>7} {'plain RSS MB':>12} {'QAT RSS MB':>10} {'RSS x':>6}")
    for shape in ("e", "moe"):
        p, q = results[shape, "plain"], results[shape, "qat"]
        print(f"{shape:<8} {q['params_m']:>8.1f} {q['trainable_m']:>11.1f} {p['step_s']:>12.3f} {q['step_s']:>10.3f} {q['step_s'] / p['step_s']:>7.2f} "
              f"{p['peak_rss_mb']:>12.0f} {q['peak_rss_mb']:>10.0f} {q['peak_rss_mb'] / p['peak_rss_mb']:>6.2f}")
    q = results["moe", "qat"]
    print(f"3-D experts ({q['experts_m']:.1f} M weights): one Q4_0 fake-quant of all of them takes {q['experts_fq_s'] * 1e3:.1f} ms, "
          f"{100 * q['experts_fq_s'] / q['step_s']:.1f}% of a QAT step (done once per forward)")


if __name__ == "__main__":
    main()
