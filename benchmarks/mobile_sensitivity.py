"""Is the mobile export gap float noise, or a modelling error? Measured on a trained run.

Loads the mobile student of a `benchmarks/mobile.py` run from its checkpoint, and compares on
held-out tokens: the .pte (ExecuTorch) vs the student; the student vs itself with relative
noise of 2e-7 and 1e-6 added to its first layer's output (what a different summation order does);
the teacher vs each. If the .pte's distance is of the size of the student's own sensitivity,
the gap comes from int8 activation codes that float rounding flips, not from the definition.

    python benchmarks/mobile_sensitivity.py [--run runs/mobile] [--tokens 255]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig, prepare
from qatkit.runtime.executorch import PteModel, text_tokens
from qatkit.train.data import default_eval_text


def kl(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    p, q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean()), 100 * float((p.argmax(-1) == q.argmax(-1)).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/mobile"))
    ap.add_argument("--tokens", type=int, default=255)
    args = ap.parse_args()
    cfg = json.loads((args.run / "train" / "config.json").read_text())
    source = resolve(cfg["model"])
    teacher, tokenizer = load(source)
    student = copy.deepcopy(teacher)
    prepare(student, source.arch, QATConfig(**cfg["qat"]))
    state = torch.load(args.run / "train" / "checkpoint.pt", map_location="cpu", weights_only=False)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    student.eval()
    path = args.run / "train" / "qat-mobile.pte"
    ids = [tokenizer.bos_token_id] + text_tokens(path, default_eval_text())[: args.tokens]
    x = torch.tensor([ids])
    with torch.no_grad():
        want, ref = student(x).logits[0].float(), teacher(x).logits[0].float()
    got = PteModel(path).logits(ids)
    print(f"{len(ids)} held-out tokens, trained student of {args.run} (step {state['step']})")
    print("  .pte vs student:              mean KL %.3e, same top %.1f%%" % kl(want, got))
    for eps in (2e-7, 1e-6):
        def noise(mod, inp, out, eps=eps):
            h = out[0] if isinstance(out, tuple) else out
            h.add_(h * eps * torch.randn(h.shape, generator=torch.Generator().manual_seed(1)))

        handle = student.model.layers[0].register_forward_hook(noise)
        with torch.no_grad():
            moved = student(x).logits[0].float()
        handle.remove()
        print(f"  student vs itself, {eps:.0e} noise: mean KL %.3e, same top %.1f%%" % kl(want, moved))
    print("  teacher vs student:           mean KL %.3e, same top %.1f%%" % kl(ref, want))
    print("  teacher vs .pte:              mean KL %.3e, same top %.1f%%" % kl(ref, got))


if __name__ == "__main__":
    main()
