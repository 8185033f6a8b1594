"""Where qatkit keeps what it derives once and reuses, and how those places are keyed.

    $QATKIT_CACHE (default ~/.cache/qatkit)/
      gguf/<name>.gguf                     the default model, assembled from its PyPI packages
      models/<model>-<file key>/           a float copy of a model (hf/), its F32 reference GGUF,
                                           llama.cpp's PTQ files and untrained mobile programs
      teacher-samples/<fingerprint>-T..-t..-s..-b../   sequences sampled from a teacher, per batch
      teacher-topk/<fingerprint>-.../      a teacher's top-k log-probs per training sequence

A file key (path, size, mtime) names a source file's version cheaply; a fingerprint hashes a
model's tensors, so a cache of a teacher's outputs is never read for another teacher.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def root() -> Path:
    return Path(os.environ.get("QATKIT_CACHE") or Path.home() / ".cache" / "qatkit")


def file_key(path: Path) -> str:
    """Identifies a file's version cheaply (path, size, mtime) for cache names."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def files_key(paths: list[Path]) -> str:
    """One key for several files (a model directory's config and weights)."""
    return hashlib.sha256("".join(file_key(f) for f in paths).encode()).hexdigest()[:16]


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's tensors (names, shapes, dtypes and bytes; tied tensors once)."""
    h = hashlib.blake2b(digest_size=16)
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_model_path(name: str) -> Path:
    return root() / "gguf" / name


def model_dir(name: str, key: str) -> Path:
    return root() / "models" / f"{name}-{key}"


def teacher_samples_dir(teacher: torch.nn.Module, seq_len: int, temperature: float, seed: int, batch_size: int) -> Path:
    return root() / "teacher-samples" / f"{fingerprint(teacher)}-T{seq_len}-t{temperature:g}-s{seed}-b{batch_size}"


def teacher_topk_root() -> Path:
    return root() / "teacher-topk"
