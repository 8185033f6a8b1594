"""`qatkit run`: the main job, stage by stage.

load -> float reference GGUF -> llama.cpp's PTQ baseline -> QAT (train, export) -> score all three
in llama.cpp on every domain of the held-out suite (with speed and memory) -> export gap of the trained file ->
report.json, report.md and plots

Files appear under `out` only as stages finish, each written atomically (qatkit/atomic.py).
Each stage reuses what an earlier run left: the float cache, the reference GGUF and the PTQ file
(cached beside the model), and the training checkpoint with `resume`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from . import QatkitError, metrics
from .atomic import write_json
from .eval.gap import export_gap, file_twin
from .eval.suite import domain_row, held_out_texts, in_domain, score_gguf_suite, summarize
from .export.model import export_trained, float_reference, ptq_llama_cpp
from .formats import get as get_format
from .models.load import load, resolve
from .report import layer_errors, write_report
from .runtime.llamacpp import decode_speed, load_rss_mb
from .train.run import RunConfig, load_run_config, qat_run

RUN_N_CTX = 512  # tokens per scored chunk, as llama-perplexity's default

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out: Path, texts: dict[str, str], chunks: int, resume: bool = False) -> dict:
    """`texts`: {domain: held-out text}, usually the suite (eval/suite.py); `chunks` per domain."""
    t0 = time.time()
    fmt = cfg.qat.fmt
    source = resolve(cfg.model)  # a bad MODEL fails here: one error line, and `out` not made yet
    log.info("[1/6] loading %s", cfg.model)
    model, tokenizer = load(source)
    log.info("[2/6] float reference (F32 GGUF)")
    teacher = float_reference(source, model, tokenizer)
    log.info("[3/6] PTQ baseline: llama.cpp's own quantizer on the float reference")
    ptq = source.cache_dir / f"ptq-llama.cpp-{fmt}{'-pure' if cfg.qat.pure else ''}.gguf"
    if not ptq.exists():
        ptq_llama_cpp(source, ptq, fmt, cfg.qat.pure, model=model, tokenizer=tokenizer)
    log.info("[4/6] quantization-aware training, %d steps", cfg.train.steps)
    trained = export_trained(qat_run(cfg, out / "train", resume=resume, loaded=(source, model, tokenizer), watch_texts=held_out_texts(texts, cfg.train_sources)))
    log.info("[5/6] scoring the three files in llama.cpp (%d chunks of each of %d held-out domains: %s), speed and memory", chunks, len(texts), ", ".join(texts))
    paths = {"teacher": str(teacher), "ptq": str(ptq), "qat": trained["gguf"]}
    domains = score_gguf_suite(paths, texts, chunks, cfg.train_sources)
    summary = summarize(domains)
    n_weights = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    files = {}
    for key, path in paths.items():
        files[key] = {"path": path, "file_bytes": os.path.getsize(path), **summary["means"][key]}
        files[key]["bits_per_weight"] = 8 * files[key]["file_bytes"] / n_weights
        files[key].update({k: v for k, v in decode_speed(path).items() if k.endswith("_tps")})
        files[key]["load_rss_mb"] = load_rss_mb(path)
    log.info("[6/6] export gap of the QAT file and per-layer errors")
    gap_text = next(iter(texts.values()))
    twin, types = file_twin(model, source.arch, paths["qat"])
    gap = export_gap(twin, types, paths["qat"], gap_text)
    ids = torch.tensor([tokenizer(gap_text[:4000])["input_ids"][:256]])
    quantized = {n: f for n, f in types.items() if get_format(f).trainable and n != "lm_head"}
    ptq_w = {n: get_format(f).fake_quant(model.get_submodule(n).weight) for n, f in quantized.items()}  # == llama.cpp's PTQ values
    qat_w = {n: twin.get_submodule(n).weight for n in quantized}
    errors = layer_errors(model, ptq_w, qat_w, ids)
    del twin
    report = {
        "model": cfg.model,
        "format": fmt,
        "files": files,
        "domains": domains,
        **{k: v for k, v in summary.items() if k != "means"},
        "export_gap": gap,
        "steps": cfg.train.steps,
        "tokens_seen": trained["tokens_seen"],
        "train_seconds": trained["train_seconds"],
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "layer_errors": errors,
        "config": json.loads(cfg.to_json()),
    }
    write_report(report, trained["metrics"], errors, out)
    write_json(out / "report.json", report, indent=2, default=list)  # tuples of the plan as lists
    return report


def _ptq_pte_path(source, qat, seq_len: int) -> Path:
    """Where the untrained (PTQ) program of a mobile plan is cached beside the model (static
    scales are calibrated on the default text in sequences of seq_len)."""
    import hashlib

    plan = json.dumps({**{k: getattr(qat, k) for k in ("mobile_weights", "int2", "int8", "keep", "embedding", "activations", "max_context")}, "calibration_seq_len": seq_len}, sort_keys=True, default=list)
    return source.cache_dir / f"ptq-mobile-{hashlib.sha256(plan.encode()).hexdigest()[:12]}.pte"


def run_mobile(cfg: RunConfig, out: Path, texts: dict[str, str], chunks: int, resume: bool = False) -> dict:
    """`qatkit run --format mobile`: the same job for the ExecuTorch program, measured in the
    ExecuTorch runtime: the untrained plan (PTQ) and the trained one (QAT) as .pte files, their
    perplexity, KL to the float teacher (torch, same chunks), size and runner speed, the export
    gap of the trained file, report.json / report.md / plots."""
    import copy

    from .export.executorch import export_pte
    from .prepare import prepare
    from .report import write_mobile_report
    from .runtime.executorch import PteModel, generate, require_executorch, score_ids, text_tokens
    from .train.run import calibrate_on_default_text

    require_executorch()
    t0 = time.time()
    if resume and (out / "train" / "config.json").exists():
        cfg = load_run_config(out / "train")  # the run being continued decides the plan
    source = resolve(cfg.model)  # a bad MODEL fails here: one error line, and `out` not made yet
    log.info("[1/5] loading %s", cfg.model)
    teacher, tokenizer = load(source)
    ptq_path = _ptq_pte_path(source, cfg.qat, cfg.train.seq_len)
    log.info("[2/5] PTQ baseline: the same plan, untrained, as an ExecuTorch program")
    if not ptq_path.exists():
        ptq = copy.deepcopy(teacher)
        prepare(ptq, source.arch, cfg.qat)
        calibrate_on_default_text(ptq, tokenizer, cfg.train.seq_len)
        export_pte(ptq, tokenizer, ptq_path, max_context=cfg.qat.max_context)
        del ptq
    log.info("[3/5] quantization-aware training, %d steps, and the trained program", cfg.train.steps)
    trained = export_trained(qat_run(cfg, out / "train", resume=resume, loaded=(source, teacher, tokenizer), watch_texts=held_out_texts(texts, cfg.train_sources)))
    student = trained.pop("student").eval()
    paths = {"ptq": ptq_path, "qat": Path(trained["pte"])}
    log.info("[4/5] scoring in ExecuTorch (%d chunks of each of %d held-out domains; the teacher in torch), speed", chunks, len(texts))
    bos = tokenizer.bos_token_id
    ref = metrics.torch_logits(teacher)
    ptes = {key: PteModel(path) for key, path in paths.items()}
    domains = {}
    if any(pte.bos != bos for pte in ptes.values()):
        raise QatkitError(f"the programs' BOS ({', '.join(str(p.bos) for p in ptes.values())}) differs from the tokenizer's ({bos})")
    keys = list(ptes)
    for name, text in texts.items():
        tokens = ([bos] if bos is not None else []) + text_tokens(paths["qat"], text)
        chunk_list = metrics.chunks(tokens, RUN_N_CTX, bos, chunks, label=name)
        # the teacher is the reference and one of the scored models: it runs once per chunk
        scores = metrics.score_chunks([ptes[k].scored_logits for k in keys] + [ref], chunk_list, ref_index=len(keys))
        rows = {"teacher": {**scores[-1].result(), "chunks": len(chunk_list), "n_ctx": RUN_N_CTX}}
        for key, sc in zip(keys, scores):
            rows[key] = {"path": str(paths[key]), **sc.result(), "chunks": len(chunk_list), "n_ctx": RUN_N_CTX}
        domains[name] = domain_row(rows, in_domain(name, cfg.train_sources))
    summary = summarize(domains)
    files = {"teacher": summary["means"]["teacher"]}
    for key, path in paths.items():
        speed = generate(path, "The capital of France is", n_tokens=64)
        files[key] = {"path": str(path), "file_bytes": path.stat().st_size, **summary["means"][key], "prefill_tps": speed.get("prefill_token_per_sec"), "decode_tps": speed.get("decode_token_per_sec")}
    log.info("[5/5] export gap of the trained program (ExecuTorch vs the student's own forward)")
    ids = text_tokens(paths["qat"], next(iter(texts.values())))
    gap = score_ids(ptes["qat"].scored_logits, ids, bos, max_chunks=min(2, chunks), ref_logits=metrics.torch_logits(student), label="export gap")
    report = {
        "model": cfg.model,
        "format": "mobile",
        "plan": {k: getattr(cfg.qat, k) for k in ("mobile_weights", "int2", "int8", "keep", "embedding", "activations")},
        "files": files,
        "domains": domains,
        **{k: v for k, v in summary.items() if k != "means"},
        "export_gap": {"kld": gap["kld"], "same_top": gap["same_top"], "tokens": gap["tokens"]},
        "steps": cfg.train.steps,
        "tokens_seen": trained["tokens_seen"],
        "train_seconds": trained["train_seconds"],
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": json.loads(cfg.to_json()),
    }
    write_mobile_report(report, trained["metrics"], out)
    write_json(out / "report.json", report, indent=2, default=list)  # tuples of the plan as lists
    return report
