"""Targets: the runtimes a trained student ships to, one module each, with the same few steps.

    gguf.py        GGUF files run by llama.cpp (formats q4_0, q8_0)
    executorch.py  the mobile format: an XNNPACK .pte run by ExecuTorch

A target answers, for one run (a `Job`: the config, the loaded teacher and its tokenizer):

    check(cfg)                      refuse a plan it cannot run, before any work
    reference(job)                  the float teacher as the runtime scores it (a file, or None:
                                    the teacher scored in torch)
    baseline(job)                   the untrained file: what plain post-training quantization gives
    export(trained)                 the trained student's file, through the quantizer it trained with
    score(job, files, texts, n)     {domain: {key: perplexity, KL, same-top row}} in the runtime
    file_facts(job, path)           speed and memory of one file in the runtime
    file_bytes(path)                what a device stores to run it (a .pte with its .ptd)
    verify(job, trained, files, t)  the export gap (runtime vs the trained student) and, where
                                    the target can say, per-layer errors of PTQ and QAT
    about(cfg)                      the report's words: runtime, file kind, labels, plan

`qatkit.pipeline.run` drives any target through these; the report only renders what they return.
The per-tensor plan is computed once, by `prepare` inside the training, and reaches the exporter
through the training's result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import QatkitError

N_CTX = 512  # tokens per scored chunk in every target, as llama-perplexity's default

if TYPE_CHECKING:
    from ..models.load import Source
    from ..train.run import RunConfig


@dataclass
class Job:
    """What every step of one run shares: its config and the loaded float teacher."""

    cfg: RunConfig
    source: Source
    teacher: Any  # the float model (transformers causal LM)
    tokenizer: Any


class Target:
    """The steps every target implements (see the module docstring)."""

    name = ""

    def check(self, cfg: RunConfig) -> None:
        pass

    def reference(self, job: Job) -> Path | None:
        raise NotImplementedError

    def baseline(self, job: Job) -> Path:
        raise NotImplementedError

    def export(self, trained: dict, progress: bool = True) -> dict:
        raise NotImplementedError

    def score(self, job: Job, files: dict[str, Path | None], texts: dict[str, str], chunks: int) -> dict[str, dict[str, dict]]:
        raise NotImplementedError

    def file_facts(self, job: Job, path: Path) -> dict:
        raise NotImplementedError

    def file_bytes(self, path: Path) -> int:
        """The bytes a device needs to run the file (its companion files included)."""
        return os.path.getsize(path)

    def verify(self, job: Job, trained: dict, files: dict[str, Path | None], text: str, chunks: int) -> tuple[dict, dict | None]:
        raise NotImplementedError

    def about(self, cfg: RunConfig) -> dict:
        raise NotImplementedError


def for_format(fmt: str) -> Target:
    """The target that runs files of `fmt` (a QATConfig.fmt)."""
    from . import executorch, gguf

    for target in (gguf.TARGET, executorch.TARGET):
        if fmt in target.formats:
            return target
    raise QatkitError(f"format {fmt!r}: no target runs it (GGUF: {', '.join(gguf.TARGET.formats)}; ExecuTorch: mobile)")


def export_trained(trained: dict, progress: bool = True) -> dict:
    """Write the student `train.run.qat_run` returned through its target's exporter: RUN_DIR/
    qat-<fmt>.gguf, or RUN_DIR/qat-mobile.pte with its tokenizer beside it. Adds the file's path
    ("path", and "gguf" or "pte") and size ("file_bytes") to `trained` and returns it."""
    return for_format(trained["config"].qat.fmt).export(trained, progress)
