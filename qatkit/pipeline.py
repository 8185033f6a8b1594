"""`qatkit run`: the main job, stage by stage, for any target (qatkit/targets/).

load -> float reference -> the baseline (llama.cpp's PTQ / the untrained program) -> QAT (train,
export through the target) -> score all three in the target's runtime on every domain of the
held-out suite (with size, speed and memory) -> export gap of the trained file -> report.json,
report.md and plots

Files appear under `out` only as stages finish, each written atomically (qatkit/atomic.py).
Each stage reuses what an earlier run left: the float cache, the reference and the baseline
(cached beside the model), and the training checkpoint with `resume`.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

from . import targets
from .atomic import write_json
from .eval.suite import domain_row, held_out_texts, in_domain, summarize
from .models.load import load, resolve
from .report import write_report
from .train.run import RunConfig, check_memory, load_run_config, qat_run

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out: Path, texts: dict[str, str], chunks: int, resume: bool = False) -> dict:
    """`texts`: {domain: held-out text}, usually the suite (eval/suite.py); `chunks` per domain."""
    t0 = time.time()
    if resume and (out / "train" / "config.json").exists():
        cfg = load_run_config(out / "train")  # the run being continued decides the plan and the baseline
    target = targets.for_format(cfg.qat.fmt)
    target.check(cfg)
    about = target.about(cfg)
    runtime = about["runtime"]
    source = resolve(cfg.model)  # a bad MODEL fails here: one error line, and `out` not made yet
    check_memory(source, cfg)
    log.info("[1/6] loading %s", cfg.model)
    teacher, tokenizer = load(source)
    job = targets.Job(cfg, source, teacher, tokenizer)
    log.info("[2/6] float reference for %s", runtime)
    reference = target.reference(job)
    log.info("[3/6] baseline: %s, untrained", about["labels"]["ptq"])
    baseline = target.baseline(job)
    log.info("[4/6] quantization-aware training, %d steps, and the trained %s file", cfg.train.steps, about["file_kind"])
    trained = target.export(qat_run(cfg, out / "train", resume=resume, loaded=(source, teacher, tokenizer), watch_texts=held_out_texts(texts, cfg.train_sources)))
    files = {"teacher": reference, "ptq": baseline, "qat": Path(trained["path"])}
    log.info("[5/6] scoring in %s (%d chunks of each of %d held-out domains: %s), size, speed and memory", runtime, chunks, len(texts), ", ".join(texts))
    domains = {name: domain_row(rows, in_domain(name, cfg.train_sources)) for name, rows in target.score(job, files, texts, chunks).items()}
    summary = summarize(domains)
    n_weights = sum(p.numel() for p in teacher.parameters())  # tied tensors counted once
    facts = {}
    for key, path in files.items():
        facts[key] = dict(summary["means"][key])
        if path is not None:
            size = target.file_bytes(path)
            facts[key] = {"path": str(path), "file_bytes": size, **facts[key], "bits_per_weight": 8 * size / n_weights, **target.file_facts(job, path)}
    log.info("[6/6] export gap: %s on the trained file vs the trained student", runtime)
    gap, errors = target.verify(job, trained, files, next(iter(texts.values())), chunks)
    report = {
        "model": cfg.model,
        "format": cfg.qat.fmt,
        **about,
        "files": facts,
        "domains": domains,
        **{k: v for k, v in summary.items() if k != "means"},
        "export_gap": gap,
        "steps": cfg.train.steps,
        "tokens_seen": trained["tokens_seen"],
        "train_seconds": trained["train_seconds"],
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": json.loads(cfg.to_json()),
    }
    if errors:
        report["layer_errors"] = errors
    write_report(report, trained["metrics"], out)
    write_json(out / "report.json", report, indent=2, default=list)  # tuples of the plan as lists
    return report
