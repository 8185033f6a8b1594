"""The teacher's top-k next-token distribution, computed once per training sequence and kept on disk.

The frozen teacher gives the same answer every time it sees a sequence, so its forward pass need
not run again: the second epoch, a resumed run and every run of a sweep over the same teacher and
data read it back. For each sequence and each position 0 .. L-2 the cache keeps the k largest
log-probabilities (at the training temperature) and their token ids; the rest of the vocabulary
is one "tail" outcome holding the remaining mass. The loss is then the KL divergence over those
k + 1 outcomes, a lower bound of the full KL (merging outcomes never increases it) that equals
it when the tail is empty.

A sequence is filled on first use, all its positions at once (so later runs may sample other
positions), and a missing sequence costs one teacher forward with the head on every position.
The loss always uses the stored values, so a run with a cold cache and one with a warm cache
train bit for bit the same.

    <root>/<key>/meta.json   k, temperature, shapes, and what the key was made from
    <root>/<key>/logp.npy    float32 (n_seqs, L-1, k)   top-k log-probabilities, descending
    <root>/<key>/ids.npy     int32   (n_seqs, L-1, k)   their token ids
    <root>/<key>/filled.npy  bool    (n_seqs,)          set after a sequence's rows are written

The key hashes the teacher's tensors, the training sequences, k and the temperature: another
teacher or other data gets another directory, never stale values.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import QatkitError, cache
from ..atomic import atomic_path
from ..cache import fingerprint

log = logging.getLogger(__name__)

HEAD_CHUNK = 64  # positions per head product while filling: (64, 262k) float32 is 67 MB


def default_root() -> Path:
    return cache.teacher_topk_root()


def _row_keys(seqs: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in seqs.cpu().to(torch.int64)]


class TeacherCache:
    """Top-k teacher log-probabilities for a fixed set of training sequences (see the module doc)."""

    def __init__(self, teacher, head, seqs: torch.Tensor, k: int, temperature: float = 1.0, root: Path | None = None):
        """teacher: the frozen model; head(hidden) -> logits, as the training loss computes them."""
        vocab = teacher.config.get_text_config().vocab_size
        if not 1 <= k <= vocab:
            raise QatkitError(f"teacher top-k {k}: must lie in 1..{vocab} (the vocabulary)")
        if seqs.ndim != 2 or seqs.shape[1] < 2:
            raise QatkitError("the teacher cache needs (n, L >= 2) token sequences")
        self.teacher, self.head, self.k, self.temperature = teacher, head, k, temperature
        keys = _row_keys(seqs)
        self.slot = {key: i for i, key in enumerate(keys)}  # a sequence repeated in the data: its last slot
        data = hashlib.blake2b(b"".join(keys), digest_size=16).hexdigest()
        teacher_fp = fingerprint(teacher)
        key = hashlib.blake2b(f"{teacher_fp}:{data}:{k}:{temperature!r}".encode(), digest_size=12).hexdigest()
        self.dir = (root or default_root()) / key
        n, positions = seqs.shape[0], seqs.shape[1] - 1
        meta = {"k": k, "temperature": temperature, "n_seqs": n, "positions": positions, "vocab": vocab,
                "teacher": teacher_fp, "data": data}
        self._open(meta)
        self.hits = self.misses = 0

    def _open(self, meta: dict) -> None:
        d, shape = self.dir, (meta["n_seqs"], meta["positions"], meta["k"])
        if not (d / "meta.json").exists():
            _create(d, meta, shape)
            log.info("teacher cache %s: new, %d sequences x %d positions x top-%d (%.0f MB when full)",
                     d, shape[0], shape[1], shape[2], shape[0] * shape[1] * shape[2] * 8 / 1e6)
        try:
            old = json.loads((d / "meta.json").read_text())
            self.logp = np.load(d / "logp.npy", mmap_mode="r+")
            self.ids = np.load(d / "ids.npy", mmap_mode="r+")
            self.filled = np.load(d / "filled.npy", mmap_mode="r+")
        except (OSError, ValueError) as e:
            raise QatkitError(f"{d}: unreadable teacher cache ({e}); delete the directory to rebuild it") from e
        if old != meta or self.logp.shape != shape or self.ids.shape != shape or self.filled.shape != shape[:1]:
            raise QatkitError(f"{d}: teacher cache does not match this teacher and data; delete the directory to rebuild it")
        log.info("teacher cache %s: %d of %d sequences filled", d, int(self.filled.sum()), shape[0])

    @torch.no_grad()
    def _fill(self, slot: int, x: torch.Tensor) -> None:
        hidden = self.teacher.model(x[None]).last_hidden_state[0, :-1]
        for p0 in range(0, hidden.shape[0], HEAD_CHUNK):
            logp = F.log_softmax(self.head(self.teacher, hidden[p0 : p0 + HEAD_CHUNK]).float() / self.temperature, -1)
            top = logp.topk(self.k, -1)
            self.logp[slot, p0 : p0 + HEAD_CHUNK] = top.values.cpu().numpy()
            self.ids[slot, p0 : p0 + HEAD_CHUNK] = top.indices.to(torch.int32).cpu().numpy()
        self.logp.flush()
        self.ids.flush()
        self.filled[slot] = True
        self.filled.flush()

    def lookup(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids and positions (P,) -> top-k log-probabilities (B, P, k) float32 and
        their ids (B, P, k) int64 on x's device, filling the sequences not yet cached."""
        slots = []
        for row, key in zip(x, _row_keys(x)):
            slot = self.slot.get(key)
            if slot is None:
                raise QatkitError("teacher cache: a batch holds a sequence that is not among the cached training data")
            if self.filled[slot]:
                self.hits += 1
            else:
                self.misses += 1
                self._fill(slot, row)
            slots.append(slot)
        p = pos.cpu().numpy()
        logp = torch.from_numpy(np.stack([self.logp[s][p] for s in slots])).to(x.device)
        ids = torch.from_numpy(np.stack([self.ids[s][p] for s in slots])).to(device=x.device, dtype=torch.int64)
        return logp, ids


def _create(d: Path, meta: dict, shape: tuple[int, int, int]) -> None:
    """Empty arrays and meta.json, made under a private name and renamed into place: two runs
    starting at once never truncate each other's arrays (the loser of the rename reads the
    winner's)."""
    with atomic_path(d, folder=True, keep_existing=True) as tmp:
        for name, dtype, shp in (("logp", np.float32, shape), ("ids", np.int32, shape), ("filled", np.bool_, shape[:1])):
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shp).flush()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if not (d / "meta.json").exists():
        raise QatkitError(f"{d}: an incomplete teacher cache is in the way; delete the directory to rebuild it")


def topk_kl(t_logp: torch.Tensor, t_ids: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the k + 1 outcomes "token i" for the teacher's top-k ids and
    "any other token" -> (...). t_logp, t_ids: (..., k); s_logp: the student's full (..., V)."""
    s_top = s_logp.gather(-1, t_ids)
    s_tail = s_logp.scatter(-1, t_ids, float("-inf")).logsumexp(-1)  # exact, no 1 - sum cancellation
    t_tail_p = 1 - t_logp.double().exp().sum(-1)  # the teacher's: constants, in float64
    # Below the rounding error of k float32 log-probabilities the tail is noise (and with k = V,
    # where the student's tail is -inf, it would make the term infinite): it is empty then.
    empty = t_tail_p <= t_logp.shape[-1] * 2.0**-23
    tail = torch.where(empty, 0.0, t_tail_p.clamp(min=1e-300) * (t_tail_p.clamp(min=1e-300).log() - s_tail.double().clamp(min=-1e300)))
    return (t_logp.exp() * (t_logp - s_top)).sum(-1) + tail.to(s_logp.dtype)
