"""What made a file: written into every file qatkit exports, so that a user (or a later qatkit)
can tell a QAT file from a PTQ one and how it was trained.

- GGUF: `general.quantized_by` = "qatkit", `qatkit.version`, `qatkit.plan` (a digest of the
  per-tensor plan: the tensor types themselves are in the file, and a digest keeps the header's
  length independent of the plan, so the planner's byte-exact size holds), `qatkit.training`
  (JSON, trained files only);
- Hugging Face and MLX directories: a "qatkit" object in config.json with the full plan;
- ExecuTorch programs: a constant method `qatkit_provenance` returning the JSON as bytes (the
  plan's digest, the training summary).
"""

from __future__ import annotations

import hashlib
import json

from .. import __version__

GGUF_KEYS = ("general.quantized_by", "qatkit.version", "qatkit.plan", "qatkit.training")


def plan_digest(plan: dict[str, str]) -> str:
    """A fixed-length name of a per-tensor plan: sha256 of its sorted JSON, 16 hex digits."""
    return "sha256:" + hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def training_summary(cfg, metrics: list[dict] | None = None, scale_cuts: int | None = None) -> dict:
    """A trained run in a few fields: its config's essentials and the held-out KL it reached."""
    t, q = cfg.train, cfg.qat
    out = {"model": str(cfg.model), "format": q.fmt, "pure": q.pure, "learn_scales": q.learn_scales, "steps": t.steps,
           "tokens": t.steps * t.tokens_per_step, "lr": t.lr, "seq_len": t.seq_len, "batch_size": t.batch_size,
           "data": cfg.train_sources, "data_free": cfg.data_free, "seed": t.seed, "faithful": t.faithful}
    kls = [r["held_out_kl"] for r in metrics or [] if "held_out_kl" in r]
    if kls:
        out["held_out_kl"] = [kls[0], kls[-1]]
    if scale_cuts is not None:
        out["scale_cuts"] = scale_cuts
    return out


def describe(plan: dict[str, str], fmt: str, training: dict | None = None, full_plan: bool = True) -> dict:
    """The provenance object of the HF/MLX config files and the .pte (whose program keeps the
    digest alone, `full_plan` False: its size then does not depend on the plan's names)."""
    out = {"tool": "qatkit", "version": __version__, "format": fmt, "plan_digest": plan_digest(plan)}
    if full_plan:
        out["plan"] = dict(plan)
    if training is not None:
        out["training"] = training
    return out


def gguf_entries(plan: dict[str, str], training: dict | None = None) -> dict[str, list]:
    """GGUF metadata entries (gguf_meta's [type, value] form)."""
    out = {"general.quantized_by": ["STRING", "qatkit"], "qatkit.version": ["STRING", __version__], "qatkit.plan": ["STRING", plan_digest(plan)]}
    if training is not None:
        out["qatkit.training"] = ["STRING", json.dumps(training, sort_keys=True)]
    return out
