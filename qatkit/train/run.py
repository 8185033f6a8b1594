"""A whole QAT training: MODEL + data -> run directory with config, checkpoints and metrics, and
the trained student in memory (`targets.export_trained` writes its file).

    run_dir/config.json      what was asked (enough to resume the run from the directory alone)
    run_dir/checkpoint.pt    trainable tensors, optimizer, step, data position (atomic)
    run_dir/metrics.jsonl    one row per step: loss, KL, lr, grad norm, tokens/s, held-out KL
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import QatkitError
from ..atomic import write_text
from ..config import RunConfig
from ..models.load import load, read_config, resolve
from ..plan import GB, describe_memory, training_memory
from ..prepare import calibrate_static, linear_weight_types, prepare
from . import distributed
from .data import default_train_texts, pack, read_texts, sample_cache_dir, sample_from_model, split
from .loop import default_device, train

log = logging.getLogger(__name__)

CALIBRATION_SEQS = 8  # training sequences that set the static int8 activation scales


def calibrate_on_default_text(model, tokenizer, seq_len: int = 256) -> int:
    """Static int8 activation scales of an untrained (PTQ) mobile model from the first
    CALIBRATION_SEQS sequences of the default training text; 0 when none is static."""
    if not any(getattr(m, "act", "dynamic") == "static" for m in model.modules()):
        return 0
    seqs = pack(tokenizer, default_train_texts(), seq_len, vocab_size=model.config.vocab_size)
    return calibrate_static(model, seqs[:CALIBRATION_SEQS])


# Sequences sampled at once, by device: on a CPU the 262k-vocab head dominates and batching it
# pays up to ~32; on a GPU one decode step costs about the same for 1 or 512 rows (kernel launches).
SAMPLE_BATCH = {"cpu": 32, "cuda": 512}


def training_data(cfg: RunConfig, teacher, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's (training, held-out) sequences: text, sequences sampled from the teacher, or a
    mix of both.

    With a share p of sampled sequences (0 < p < 1), the run's steps x batch sequences are made
    of round(p x that) samples and a seeded choice of the text's sequences for the rest, so one
    epoch is exactly the mix asked for; the held-out sequences (training-time KL) come from the
    text. p = 0 trains on the whole text as before; p = 1 on samples only (LLM-QAT)."""
    p = cfg.data_free
    if not 0 <= p <= 1:
        raise QatkitError(f"data_free {p}: the share of sampled sequences lies in [0, 1]")
    seq_len, seed = cfg.train.seq_len, cfg.train.seed
    per_epoch = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum
    n_free = round(p * per_epoch) if p < 1 else per_epoch
    samples = None
    if n_free:
        n_sampled = n_free + (cfg.held_out if p == 1 else 0)  # with no text, the held-out sequences are samples too
        device = default_device()  # the device training will use: CUDA when present
        batch = SAMPLE_BATCH.get(device.type, SAMPLE_BATCH["cpu"])
        cache = sample_cache_dir(teacher, seq_len, 1.0, seed, batch)
        log.info("sampling %d sequences of %d tokens from the teacher on %s (cached in %s)", n_sampled, seq_len, device.type, cache)
        teacher.to(device)
        try:
            samples = sample_from_model(teacher, tokenizer, n_sampled, seq_len, seed=seed, batch_size=batch, cache_dir=cache)
        finally:
            teacher.cpu()
    if p == 1:
        train_seqs, held = split(samples, cfg.held_out, seed=seed)
    else:
        texts = read_texts(cfg.train_sources)
        seqs = pack(tokenizer, texts, seq_len, vocab_size=teacher.config.vocab_size)
        train_seqs, held = split(seqs, cfg.held_out, seed=seed)
        if samples is not None:
            n_text = per_epoch - n_free
            if len(train_seqs) > n_text:
                keep = torch.from_numpy(np.random.default_rng([seed, 1]).choice(len(train_seqs), n_text, replace=False))
                train_seqs = train_seqs[keep.sort().values]
            elif len(train_seqs) < n_text:
                log.warning("the text gives %d of the %d sequences asked for: %.0f%% of each epoch is sampled, not %.0f%% (give more text with --data)",
                            len(train_seqs), n_text, 100 * n_free / (n_free + len(train_seqs)), 100 * p)
            train_seqs = torch.cat([train_seqs, samples])
    log.info("data: %d training sequences of %d tokens (%d sampled from the teacher), %d held out", len(train_seqs), seq_len, n_free, len(held))
    return train_seqs, held


def _watch_seqs(texts: dict[str, str], tokenizer, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The first training-length sequence of each text (a text shorter than that is not watched)."""
    out = {}
    for name, text in texts.items():
        try:
            out[name] = pack(tokenizer, [text], seq_len, vocab_size=vocab_size)[:1]
        except QatkitError as e:
            log.info("not watching %s during training: %s", name, e)
    return out


def memory_estimate(config, t, world: int = 1, device: str = "cuda") -> dict:
    """plan.training_memory for the run's training settings, on `world` devices."""
    return training_memory(config, t.batch_size, t.seq_len, t.kl_positions, t.grad_checkpointing, world=world, teacher_dtype=t.teacher_dtype,
                           device=device)


def check_memory(source, cfg: RunConfig, world: int = 1) -> dict:
    """Log the run's memory estimate per device (plan.training_memory) before anything is loaded,
    and refuse a CUDA device whose free memory cannot hold it."""
    t = cfg.train
    device = default_device()
    need = memory_estimate(read_config(source.hf_dir), t, world, device.type)
    log.info("memory estimate for %s, batch %d x %d: %s", device.type, t.batch_size, t.seq_len, describe_memory(need))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        if need["total"] > free:
            raise QatkitError(f"this run needs {describe_memory(need)}; the GPU has {free / GB:.1f} of {total / GB:.1f} GB free "
                              "(lower --batch-size or --seq-len, add --grad-checkpointing, or use a larger device)")
    return need


def make_student(model, source, cfg: RunConfig, train_seqs: torch.Tensor) -> dict[str, str]:
    """Turn a copy of the teacher into the QAT student, in place: fake-quant modules per the plan
    (returned), static int8 activation scales from the first training sequences (a resumed run
    loads its own over them)."""
    plan = prepare(model, source.arch, cfg.qat)
    calibrate_static(model, train_seqs[:CALIBRATION_SEQS])
    return plan


def _gathered_student(sharded, source, cfg: RunConfig, train_seqs: torch.Tensor, group: distributed.Group):
    """After a sharded training: the trained tensors gathered on rank 0 into a plain student,
    made as the sharded one was (make_student) from a fresh load; None on the other ranks."""
    trained = distributed.full_trainable_state(sharded)  # collective
    if not group.main:
        return None
    teacher, _ = load(source)
    make_student(teacher, source, cfg, train_seqs)
    result = teacher.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise QatkitError(f"the gathered student has tensors a fresh one lacks: {result.unexpected_keys[:3]}")
    return teacher.eval()


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.exists():
        raise QatkitError(f"{run_dir}: no config.json, so there is no run to resume here")
    return RunConfig.from_json(path.read_text())


def qat_run(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True, loaded=None, watch_texts: dict[str, str] | None = None,
            group: distributed.Group | None = None) -> dict:
    """Train (or resume); returns the metrics and the trained student with what exporting it
    needs (source, tokenizer, plan). `loaded` = (source, teacher, tokenizer) to reuse a load.
    `watch_texts` {name: text}: the KL on the first sequence of each is logged at every
    evaluation (a torch-side curve of held-out domains; never trained on). A caller that will
    export to ExecuTorch checks for it first (runtime.executorch.require_executorch).
    The run directory appears with its config.json, once the model and data are in hand: bad
    input leaves nothing behind.
    group: one process of a torchrun launch (train/distributed.py): the models are sharded, and
    only rank 0's result holds the trained student (the others' "student" is None)."""
    if resume and (run_dir / "config.json").exists():
        saved = load_run_config(run_dir)
        if saved != cfg:
            log.info("resuming with the run directory's own config (%s)", run_dir / "config.json")
        cfg = saved
    elif resume:
        log.info("nothing to resume in %s; starting a new run", run_dir)
    if group is not None:
        distributed.check_supported(cfg, group)
    torch.manual_seed(cfg.train.seed)
    t0 = time.time()
    # Under torchrun the processes take turns: each holds whole copies of the models in host
    # memory only until its shards are made (rank 0 first, filling the conversion and sample caches)
    with distributed.in_turn(group):
        if loaded is None:
            source = resolve(cfg.model)
            check_memory(source, cfg, group.world if group else 1)
            teacher, tokenizer = load(source)
        else:
            source, teacher, tokenizer = loaded
        train_seqs, held = training_data(cfg, teacher, tokenizer)
        student = copy.deepcopy(teacher).requires_grad_(True)  # (a teacher that trained a student before is frozen)
        if cfg.train.teacher_dtype != "float32":  # after the copy: the student trains in float32
            # a caller's teacher (`loaded`) stays float32: it goes on to measure the export gap
            teacher = (copy.deepcopy(teacher) if loaded is not None else teacher).to(getattr(torch, cfg.train.teacher_dtype))
        plan = make_student(student, source, cfg, train_seqs)
        if group is not None:
            distributed.shard(student, group)
            distributed.shard(teacher, group)
    if group is None or group.main:
        write_text(run_dir / "config.json", cfg.to_json())
    types = None
    if cfg.train.faithful:
        if cfg.qat.fmt == "mobile":
            raise QatkitError("faithful training rounds as llama.cpp does; the mobile student already rounds as XNNPACK does")
        types = linear_weight_types(student, source.arch, plan)
    watch = _watch_seqs(watch_texts or {}, tokenizer, cfg.train.seq_len, teacher.config.vocab_size)
    rows = train(student, teacher, train_seqs, held, cfg.train, run_dir, resume=resume, progress=progress, weight_types=types, watch=watch, group=group)
    if group is not None:
        student = _gathered_student(student, source, cfg, train_seqs, group)
    return {"run_dir": str(run_dir), "config": cfg, "steps": cfg.train.steps, "tokens_seen": cfg.train.steps * cfg.train.tokens_per_step,
            "train_seconds": round(time.time() - t0, 1), "metrics": rows, "plan": plan, "student": student, "source": source, "tokenizer": tokenizer}


class _NoData:
    """The data position a checkpoint restores, for a caller that trains no further."""

    def load_state_dict(self, state) -> None:
        pass


def trained_student(run_dir: Path) -> dict:
    """A finished run's trained student, rebuilt from its directory alone (config.json and the
    last checkpoint, one-process or sharded): what `qat_run` returns, for exporting it again in
    another format. A run that has not reached its last step is refused (--resume finishes it)."""
    from .loop import _read_rows, _resume, make_optimizer

    cfg = load_run_config(run_dir)
    if cfg.qat.fmt == "mobile":
        raise QatkitError(f"{run_dir}: a mobile run; its student exports as a .pte (qatkit train --resume --export --out {run_dir})")
    if not (run_dir / "checkpoint.pt").exists() and distributed.latest(run_dir) is None:
        raise QatkitError(f"{run_dir}: no checkpoint, so no trained student (the run never saved a step)")
    source = resolve(cfg.model)
    student, tokenizer = load(source)
    student.requires_grad_(True)
    plan = prepare(student, source.arch, cfg.qat)
    step = _resume(run_dir, student, make_optimizer(student, cfg.train), _NoData(), None)
    if step < cfg.train.steps:
        raise QatkitError(f"{run_dir}: the run stopped at step {step} of {cfg.train.steps}; finish it first (qatkit train --resume --out {run_dir})")
    student.requires_grad_(False).eval()
    return {"run_dir": str(run_dir), "config": cfg, "steps": cfg.train.steps, "metrics": _read_rows(run_dir / "metrics.jsonl"),
            "plan": plan, "student": student, "source": source, "tokenizer": tokenizer}
