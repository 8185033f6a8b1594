"""The QAT training loop: distil a fake-quantized student from its frozen float teacher.

Read top to bottom, in the order things happen each step:
  learning rate (warm-up + cosine) -> fake-quant on after `fq_warmup` steps -> for each
  micro-batch: teacher and student hidden states, the output head applied only at the sampled
  positions (the head of a 262k vocabulary is most of a CPU step), KL(teacher || student) at
  temperature T (+ optional cross-entropy on the data) -> clip -> AdamW -> log -> evaluate ->
  checkpoint.

Determinism: the batch order comes from `Batches` (seed, epoch) and the sampled positions from a
generator seeded by (seed, step), so a run resumed from a checkpoint ends with the same weights
as an uninterrupted one. Checkpoints hold the trainable tensors, the optimizer, the step and
the data position, written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from .. import QatkitError
from ..atomic import atomic_path, remove_stale
from ..config import TrainConfig
from ..metrics import compare
from ..nn import FakeQuantExperts, FakeQuantLinear
from ..progress import bar as progress_bar
from . import distributed
from .data import Batches
from .teacher_cache import TeacherCache, topk_kl

log = logging.getLogger(__name__)
MAX_SKIPPED = 10  # non-finite steps in a row before the run stops: the weights are not coming back


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_at(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's float logits at positions `pos` of x (B, L): the output head runs on those
    rows only (the head of a 262k vocabulary is most of a CPU step). Through the model's own
    forward (`logits_to_keep`, soft-capping included), so that FSDP's hooks on the root see it;
    bit for bit what `_head` gives on the decoder's hidden states."""
    return model(x, logits_to_keep=pos, use_cache=False).logits.float()


def positions(seq_len: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted random positions (predicting the next token: 0 .. seq_len-2)."""
    n = max(1, round((seq_len - 1) * fraction))
    return torch.randperm(seq_len - 1, generator=gen)[:n].sort().values


def kl_per_position(t_logp: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position from log-probabilities (..., vocab) -> (...)."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def distill_loss(student, teacher, x: torch.Tensor, pos: torch.Tensor, cfg: TrainConfig, cache: TeacherCache | None = None,
                 student_context: Callable[[], ContextManager] = nullcontext) -> tuple[torch.Tensor, dict]:
    """KL(teacher || student) at temperature T on positions `pos` (x: (B, L) token ids). With a
    `cache`, the teacher's side is its stored top-k (the KL over k + 1 outcomes, at T); the
    student's forward runs inside `student_context()` (the llama.cpp-faithful rounding)."""
    T = cfg.temperature
    if cache is None:
        with torch.no_grad():
            t_logits = logits_at(teacher, x, pos)
    with student_context():
        s_logits = logits_at(student, x, pos)
    s_logp = F.log_softmax(s_logits / T, -1)
    if cache is not None:
        kl = topk_kl(*cache.lookup(x, pos), s_logp).mean()
    else:
        kl = kl_per_position(F.log_softmax(t_logits / T, -1), s_logp).mean()
    loss = kl * T * T  # T^2 keeps gradient sizes comparable across temperatures
    if cache is None and T != 1:  # report the KL at T=1, the one evaluation measures
        with torch.no_grad():
            kl = kl_per_position(F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)).mean()
    stats = {"kl": float(kl.detach())}
    if cfg.ce_weight:
        ce = F.cross_entropy(s_logits.flatten(0, 1), x[:, pos + 1].flatten())
        loss = (1 - cfg.ce_weight) * loss + cfg.ce_weight * ce
        stats["ce"] = float(ce.detach())
    return loss, stats


@torch.no_grad()
def held_out_kl(student, teacher, seqs: torch.Tensor, batch_size: int = 1) -> float:
    """Mean KL(teacher || student) at T=1 over every position of the held-out sequences, in
    float64 (qatkit/metrics.py, the measure every runtime's KLD uses)."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        x = seqs[i : i + batch_size]
        pos = torch.arange(x.shape[1] - 1, device=x.device)
        t = logits_at(teacher, x, pos).flatten(0, 1)
        s = logits_at(student, x, pos).flatten(0, 1)
        total += compare(t, s)["kld"] * len(t)
        count += len(t)
    return total / count


def _trainable(student) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in student.named_parameters() if p.requires_grad}


def make_optimizer(student, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = _trainable(student)
    scales = [p for n, p in params.items() if n.endswith(".scale")]
    act_scales = [p for n, p in params.items() if n.endswith(".act_log_scale")]
    weights = [p for n, p in params.items() if not n.endswith((".scale", ".act_log_scale"))]
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0, "base_lr": cfg.scale_lr})
    if act_scales:
        groups.append({"params": act_scales, "lr": cfg.act_scale_lr, "weight_decay": 0.0, "base_lr": cfg.act_scale_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def checkpoint_state(student, opt, step: int, batches: Batches, cfg: TrainConfig) -> dict:
    """A snapshot of what a checkpoint holds, its tensors copied: training may go on changing the
    live ones while the snapshot is written."""
    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    return {
        "step": step,
        "params": {n: copy(p) for n, p in _trainable(student).items()},
        "optimizer": copy(opt.state_dict()),
        "batches": batches.state_dict(),
        "config": asdict(cfg),
    }


def write_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # whole and fsynced, or the previous one stays
        torch.save(state, tmp)


def save_checkpoint(path: Path, student, opt, step: int, batches: Batches, cfg: TrainConfig) -> None:
    write_checkpoint(path, checkpoint_state(student, opt, step, batches, cfg))


class CheckpointWriter:
    """Writes checkpoints in a background thread: the step loop pays for the snapshot (a copy
    in memory), not for serialising and fsyncing ~1.2 GB. One write at a time; a failed write
    (a full disk) is raised at the next save or at `wait`."""

    def __init__(self):
        self._thread = None
        self._error: BaseException | None = None

    def save(self, path: Path, state: dict) -> None:
        self.wait()

        def run():
            try:
                write_checkpoint(path, state)
            except BaseException as e:  # handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="qatkit-checkpoint", daemon=False)
        self._thread.start()

    def settle(self) -> None:
        """Let a running write end (whole, or not at all) without raising its error: for a loop
        that is already failing."""
        if self._thread is not None:
            self._thread.join()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, unpickled with torch's weights-only loader (tensors, numbers,
    strings and containers; no code runs): a broken or foreign file is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError (cut), ...
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise QatkitError(f"{path}: not a readable qatkit checkpoint ({why})") from None
    if not isinstance(state, dict) or not {"step", "params", "optimizer", "batches"} <= set(state):
        raise QatkitError(f"{path}: not a qatkit checkpoint (it lacks the step, weights, optimizer or data position)")
    return state


def load_checkpoint(path: Path, student, opt, batches: Batches, state: dict | None = None, sharded: bool = False) -> int:
    """Put checkpoint.pt's tensors, optimizer state and data position into this run; returns its
    step. `state`: the file already read; `sharded`: the student is under FSDP2 (a run of W
    processes continuing one of a single process)."""
    state = read_checkpoint(path) if state is None else state
    params = _trainable(student)
    missing = set(params) ^ set(state["params"])
    if missing:
        raise QatkitError(f"{path}: checkpoint does not match this student ({len(missing)} tensors differ, e.g. {sorted(missing)[0]})")
    for n, p in params.items():
        v = state["params"][n]
        if not isinstance(v, torch.Tensor) or v.shape != p.shape or not torch.isfinite(v).all():
            raise QatkitError(f"{path}: {n} is not a finite tensor of shape {tuple(p.shape)}")
    try:
        if sharded:
            distributed.load_whole(state, student, opt)
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["params"][n])
            opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise QatkitError(f"{path}: its optimizer state does not fit this run ({e})") from None
    batches.load_state_dict(state["batches"])
    return int(state["step"])


def _resume(run_dir: Path, student, opt, batches: Batches, group: distributed.Group | None) -> int:
    """Continue from the run's newest checkpoint of either kind, checkpoint.pt (one process) or
    a sharded one (torchrun), whatever the number of processes now; returns its step (0: none)."""
    ckpt = run_dir / "checkpoint.pt"
    sharded = distributed.latest(run_dir)
    state = read_checkpoint(ckpt) if ckpt.exists() else None
    if sharded is not None and (state is None or sharded[1] >= int(state["step"])):
        where, step = sharded[0], distributed.load(sharded[0], student, opt, batches)
    elif state is not None:
        where, step = ckpt, load_checkpoint(ckpt, student, opt, batches, state, sharded=group is not None)
    else:
        return 0
    log.info("resumed from %s at step %d", where, step)
    return step


def _follow_scale_cuts(student) -> int:
    """Learned Q4_0 scales take the cut that keeps each block re-quantizable (nn.FakeQuantLinear
    .follow_scale_cut_) after every update; returns the number of blocks cut (this process's)."""
    return sum(m.follow_scale_cut_() for m in student.modules() if isinstance(m, FakeQuantLinear))


def _set_fake_quant(student, on: bool) -> None:
    for m in student.modules():
        if isinstance(m, FakeQuantLinear):
            m.enabled = on
        elif isinstance(getattr(m, "qat", None), FakeQuantExperts):
            m.qat.enabled = on


def default_device() -> torch.device:
    """CUDA when present. Training stays in float32 there too (TF32 off): bf16 autocast would
    round the fake-quantized weights themselves (a Q4_0 value (q - 8) * fp16(d) needs up to 14
    significant bits, bf16 has 8), and the student would no longer compute what the file holds."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def train(student, teacher, train_seqs: torch.Tensor, held_seqs: torch.Tensor, cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True, device: torch.device | None = None,
          weight_types: dict[str, str] | None = None, watch: dict[str, torch.Tensor] | None = None, group: distributed.Group | None = None,
          loss_fn=None) -> list[dict]:
    """Train `student` in place on `device` (default: CUDA when present); returns the metrics rows
    (also appended to run_dir/metrics.jsonl). Both models are back on the CPU afterwards.
    weight_types: {Linear module name: GGUF format}, which `cfg.faithful` needs.
    watch: {name: sequences} whose KL is logged at every evaluation (row["watch_kl"][name]),
    never trained on: text of other domains, to see whether the gain carries over.
    group: this process's place in a torchrun launch; both models are then sharded with FSDP2
    (train/distributed.py; here, unless the caller did) and stay so.
    loss_fn: another objective with `distill_loss`'s arguments and result ((loss, stats with a
    "kl"); the MTP drafter's, train/drafter.py); the loop, checkpoints and resume are the same."""
    if group is not None:
        device = group.device
        for model in (student, teacher):
            if not distributed.is_sharded(model):
                distributed.shard(model, group)
    else:
        device = device or default_device()
        student.to(device)
        teacher.to(device)
    try:
        student_context = nullcontext
        if cfg.faithful:
            if not weight_types:
                raise QatkitError("faithful training needs the GGUF weight type of each Linear")
            from ..runtime.faithful import llamacpp_faithful

            student_context = partial(llamacpp_faithful, student, weight_types, exact=False)
        watch = {k: v.to(device) for k, v in (watch or {}).items()}
        return _train(student, teacher, train_seqs, held_seqs.to(device) if held_seqs is not None else None, cfg, run_dir, resume, progress, device, student_context, watch, group,
                      loss_fn or distill_loss)
    finally:
        if group is None:
            student.cpu()
            teacher.cpu()


def enable_grad_checkpointing(model) -> None:
    """Recompute each decoder layer's forward in backward (transformers >= 5 renamed the switch)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def _evaluate(student, teacher, held_seqs, watch: dict) -> dict:
    row = {"held_out_kl": held_out_kl(student, teacher, held_seqs)}
    if watch:
        row["watch_kl"] = {k: held_out_kl(student, teacher, v) for k, v in watch.items()}
    return row


def _train(student, teacher, train_seqs, held_seqs, cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, device: torch.device, student_context, watch: dict,
           group: distributed.Group | None = None, loss_fn=None) -> list[dict]:
    main = group is None or group.main  # the process that logs and writes the run's files
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    teacher.eval().requires_grad_(False)
    student.train()
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(student)
    opt = make_optimizer(student, cfg)
    batches = Batches(train_seqs, cfg.batch_size, cfg.seed)
    cache = None
    if cfg.teacher_topk:
        cache = TeacherCache(teacher, _head, train_seqs, cfg.teacher_topk, cfg.temperature, Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else None)
    if main and remove_stale(ckpt) + distributed.remove_unfinished(run_dir):  # writes cut by kill -9: never a checkpoint itself, which is whole
        log.info("removed an unfinished checkpoint write left by an interrupted run")
    if group is not None:
        distributed.barrier(group)
    start = _resume(run_dir, student, opt, batches, group) if resume else 0
    rows = [r for r in _read_rows(metrics_path) if r["step"] < start] if resume else []
    if start == 0 and held_seqs is not None and len(held_seqs):
        _set_fake_quant(student, cfg.fq_warmup == 0)
        rows.append({"step": -1, **_evaluate(student, teacher, held_seqs, watch)})  # before any update
    if main:
        _write_rows(metrics_path, rows)

    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="QAT", unit="step", disable=not (progress and main))
    t_last = time.time()
    done, data_at_step, updating, skipped = start, batches.state_dict(), False, 0
    writer = CheckpointWriter()
    try:
        for step in bar:
            data_at_step = batches.state_dict()
            row = _step(student, teacher, opt, batches, step, cfg, device, cache, student_context, group, loss_fn or distill_loss)
            if math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]):
                updating, skipped = True, 0
                opt.step()
                cuts = _follow_scale_cuts(student)
                if cuts:
                    row["scale_cuts"] = cuts
            else:  # a NaN/Inf loss or gradient never reaches the weights (nor a checkpoint)
                skipped += 1
                row["skipped"] = True
                log.warning("step %d: loss %s, gradient norm %s: not finite; the step is skipped (no update)", step, row["loss"], row["grad_norm"])
                if skipped >= MAX_SKIPPED:
                    raise QatkitError(f"{skipped} steps in a row had non-finite losses or gradients (last: step {step}); lower --lr, or check the data")
            opt.zero_grad(set_to_none=True)
            updating, done = False, step + 1
            now = time.time()
            row["tokens_per_s"] = round(cfg.tokens_per_step / max(now - t_last, 1e-9), 1)
            t_last = now
            if held_seqs is not None and len(held_seqs) and (done % cfg.eval_every == 0 or done == cfg.steps):
                student.eval()
                row.update(_evaluate(student, teacher, held_seqs, watch))
                student.train()
            rows.append(row)
            if main:
                _write_rows(metrics_path, [row], append=True)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                if group is not None:  # collective: every process writes its shards
                    distributed.save(run_dir, student, opt, done, batches, cfg, group)
                else:
                    writer.save(ckpt, checkpoint_state(student, opt, done, batches, cfg))
        writer.wait()  # the last checkpoint is on disk before training returns
    except KeyboardInterrupt:
        if group is not None:
            # each process is cut at its own point, so a collective save could hang: the last
            # periodic checkpoint is the one to resume from
            log.warning("interrupted: --resume continues from the last checkpoint (every %d steps)", cfg.ckpt_every)
            raise
        # Keep what is finished: the weights after `done` whole steps and the data position at
        # the start of the step that was cut (its partial gradients are dropped).
        writer.wait()
        if not updating and done > start:
            opt.zero_grad(set_to_none=True)
            batches.load_state_dict(data_at_step)
            save_checkpoint(ckpt, student, opt, done, batches, cfg)
            log.warning("interrupted: checkpoint after step %d saved in %s; --resume continues", done, ckpt)
        raise
    finally:
        writer.settle()  # an error may have left a write running
        bar.close()
        if cache is not None:
            log.info("teacher cache: %d sequences read, %d computed and stored", cache.hits, cache.misses)
    student.eval()
    return rows


def _step(student, teacher, opt, batches: Batches, step: int, cfg: TrainConfig, device: torch.device, cache=None, student_context=nullcontext,
          group: distributed.Group | None = None, loss_fn=None) -> dict:
    """Forward and backward of one optimizer step (all micro-batches); returns its metrics row.
    With a `group`, each process takes its share of every micro-batch; the statistics are the
    means over the processes."""
    lr_scale = lr_at(step, cfg) / cfg.lr
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_scale
    _set_fake_quant(student, step >= cfg.fq_warmup)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    stats_sum: dict[str, float] = {}
    for _ in range(cfg.grad_accum):
        x = distributed.local_batch(next(batches), group).to(device)
        loss, stats = (loss_fn or distill_loss)(student, teacher, x, positions(x.shape[1], cfg.kl_positions, gen).to(device), cfg, cache, student_context)
        (loss / cfg.grad_accum).backward()
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
    stats_sum = distributed.mean_over(stats_sum, group)
    grad_norm = distributed.global_norm(torch.nn.utils.clip_grad_norm_(list(_trainable(student).values()), cfg.grad_clip))  # (non-finite: the caller skips the step)
    return {"step": step, **{k: round(v, 6) for k, v in stats_sum.items()}, "lr": lr_at(step, cfg), "grad_norm": round(float(grad_norm), 4), "fake_quant": step >= cfg.fq_warmup}


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a last line a kill cut in half is dropped (its step is redone)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            break
        rows.append(row)
    return rows


def _write_rows(path: Path, rows: list[dict], append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
