"""A whole QAT run: MODEL + data -> run directory with config, checkpoints, metrics and the GGUF.

    run_dir/config.json      what was asked (enough to resume the run from the directory alone)
    run_dir/checkpoint.pt    trainable tensors, optimizer, step, data position (atomic)
    run_dir/metrics.jsonl    one row per step: loss, KL, lr, grad norm, tokens/s, held-out KL
    run_dir/qat-<fmt>.gguf   the trained student, written through the same quantizer it trained with
    run_dir/qat-mobile.pte   (--format mobile) the same for ExecuTorch, with qat-mobile.tokenizer.json
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import QatkitError
from ..export.model import export_model
from ..models.load import load, resolve
from ..prepare import QATConfig, calibrate_static, convert, linear_weight_types, prepare
from .data import default_train_texts, pack, read_texts, sample_from_model, split
from .loop import TrainConfig, train

log = logging.getLogger(__name__)

CALIBRATION_SEQS = 8  # training sequences that set the static int8 activation scales


@dataclass
class RunConfig:
    model: str
    data: list[str] = field(default_factory=list)  # empty: the default training text
    data_free: int = 0  # > 0: train on this many sequences sampled from the teacher (LLM-QAT)
    held_out: int = 4  # sequences of the training corpus kept aside for held-out KL
    qat: QATConfig = field(default_factory=QATConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        d = json.loads(text)
        return cls(model=d["model"], data=d["data"], data_free=d.get("data_free", 0), held_out=d["held_out"], qat=QATConfig(**d["qat"]), train=TrainConfig(**d["train"]))


def calibrate_on_default_text(model, tokenizer, seq_len: int = 256) -> int:
    """Static int8 activation scales of an untrained (PTQ) mobile model from the first
    CALIBRATION_SEQS sequences of the default training text; 0 when none is static."""
    if not any(getattr(m, "act", "dynamic") == "static" for m in model.modules()):
        return 0
    seqs = pack(tokenizer, default_train_texts(), seq_len, vocab_size=model.config.vocab_size)
    return calibrate_static(model, seqs[:CALIBRATION_SEQS])


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.exists():
        raise QatkitError(f"{run_dir}: no config.json, so there is no run to resume here")
    return RunConfig.from_json(path.read_text())


def qat_run(cfg: RunConfig, run_dir: Path, resume: bool = False, export: bool = True, progress: bool = True, loaded=None) -> dict:
    """Train (or resume) and export. `loaded` = (source, teacher, tokenizer) to reuse a load."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.json").exists():
        saved = load_run_config(run_dir)
        if saved != cfg:
            log.info("resuming with the run directory's own config (%s)", run_dir / "config.json")
        cfg = saved
    elif resume:
        log.info("nothing to resume in %s; starting a new run", run_dir)
    torch.manual_seed(cfg.train.seed)
    if export and cfg.qat.fmt == "mobile":
        from ..export.executorch import require_executorch

        require_executorch()  # before the training, not after it
    t0 = time.time()
    if loaded is None:
        source = resolve(cfg.model)
        teacher, tokenizer = load(source)
    else:
        source, teacher, tokenizer = loaded
    if cfg.data_free:
        if cfg.data:
            raise QatkitError("give training text or --data-free, not both")
        seqs = sample_from_model(teacher, tokenizer, cfg.data_free + cfg.held_out, cfg.train.seq_len, seed=cfg.train.seed)
    else:
        texts = read_texts(cfg.data) if cfg.data else default_train_texts()
        seqs = pack(tokenizer, texts, cfg.train.seq_len, vocab_size=teacher.config.vocab_size)
    train_seqs, held = split(seqs, cfg.held_out, seed=cfg.train.seed)
    log.info("data: %d training sequences of %d tokens, %d held out", len(train_seqs), cfg.train.seq_len, len(held))
    student = copy.deepcopy(teacher)
    plan = prepare(student, source.arch, cfg.qat)
    calibrate_static(student, train_seqs[:CALIBRATION_SEQS])  # static int8 scales; a resumed run loads its own over them
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(cfg.to_json())
    os.replace(tmp, run_dir / "config.json")
    types = None
    if cfg.train.faithful:
        if cfg.qat.fmt == "mobile":
            raise QatkitError("faithful training rounds as llama.cpp does; the mobile student already rounds as XNNPACK does")
        types = linear_weight_types(student, source.arch, plan)
    rows = train(student, teacher, train_seqs, held, cfg.train, run_dir, resume=resume, progress=progress, weight_types=types)
    result = {"run_dir": str(run_dir), "steps": cfg.train.steps, "tokens_seen": cfg.train.steps * cfg.train.tokens_per_step, "train_seconds": round(time.time() - t0, 1), "metrics": rows, "plan": plan}
    if export and cfg.qat.fmt == "mobile":
        from ..export.executorch import export_pte

        info = export_pte(student, tokenizer, run_dir / "qat-mobile.pte", max_context=cfg.qat.max_context)
        result["pte"] = info["path"]
        result["file_bytes"] = info["file_bytes"]
    elif export:
        scales = convert(student, source.arch)
        out = run_dir / f"qat-{cfg.qat.fmt}.gguf"
        info = export_model(student, tokenizer, source, out, cfg.qat.fmt, cfg.qat.pure, q4_0_scales=scales, progress=progress)
        result["gguf"] = info["path"]
        result["file_bytes"] = info["file_bytes"]
    result["student"] = student
    return result
