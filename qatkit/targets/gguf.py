"""The GGUF target: files llama.cpp loads (Q4_0 / Q8_0 with llama.cpp's per-tensor mix).

- reference: the float teacher as an F32 GGUF, cached beside the model's float copy;
- baseline: llama.cpp's own quantizer (llama-quantize through llama-cpp-python) on that file;
- export: the trained student through the very quantizer it trained with (learned Q4_0 scales
  written as they are), under the plan `prepare` computed;
- score: perplexity, KL to the teacher file and same-top in llama.cpp (the teacher runs once per
  chunk); speed and load memory in llama.cpp;
- verify: the export gap (llama.cpp on the QAT file vs a torch twin carrying the file's own
  weights, with and without llama.cpp's activation roundings) and per-layer errors.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from .. import QatkitError
from ..export.gguf import export_model, load_gguf_weights
from ..formats import TRAINABLE
from ..formats import get as get_format
from ..metrics import compare, layer_errors
from ..models.arch import Arch
from ..models.load import Source, load
from ..plan import FILE_FORMATS
from ..runtime.faithful import llamacpp_faithful
from ..runtime.llamacpp import adds_bos, chunk_logits, decode_speed, llama_quantize, load_rss_mb, open_model, score_files, tokenize
from . import N_CTX, Job, Target

log = logging.getLogger(__name__)

LAYER_TOKENS = 256  # tokens of held-out text whose activations the per-layer errors are taken on


def float_reference(source: Source, model=None, tokenizer=None, fmt: str = "f32") -> Path:
    """The float teacher as a GGUF (the reference for evaluation and the input of llama.cpp's
    quantizer), cached beside the model's float copy."""
    path = source.cache_dir / f"teacher-{fmt}.gguf"
    if not path.exists():
        if model is None:
            model, tokenizer = load(source)
        export_model(model, tokenizer, source, path, fmt)
    return path


def ptq_llama_cpp(source: Source, out: str | os.PathLike, fmt: str, pure: bool = False, model=None, tokenizer=None) -> dict:
    """llama.cpp's own quantizer on the float teacher (the baseline QAT must beat)."""
    if fmt not in FILE_FORMATS:
        raise QatkitError(f"format {fmt!r}: choose from {', '.join(FILE_FORMATS)}")
    ref = float_reference(source, model, tokenizer)
    llama_quantize(str(ref), str(out), ftype=fmt, pure=pure)
    return {"path": str(out), "format": fmt, "pure": pure, "ptq": "llama.cpp", "source": str(ref), "file_bytes": os.path.getsize(out)}


def file_twin(model: torch.nn.Module, arch: Arch, path: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """A copy of `model` carrying the weights of the GGUF file `path` (what llama.cpp computes
    with), and {Linear name: format} of the file."""
    twin = copy.deepcopy(model)
    return twin, load_gguf_weights(twin, arch, path)


def export_gap(twin: torch.nn.Module, types: dict[str, str], path: str, text: str, n_tokens: int = 512) -> dict:
    """llama.cpp on `path` vs `twin` (a `file_twin`) over the first n_tokens of `text` (BOS first):
    {"tokens", "plain": compare(...), "faithful": compare(...)}, plain with float activations,
    faithful with llama.cpp's activation roundings modelled (runtime/faithful). Zero means
    llama.cpp computes what the trained student computed."""
    llm = open_model(path, n_ctx=n_tokens)
    ids = (([llm.token_bos()] if adds_bos(llm) else []) + tokenize(llm, text))[:n_tokens]
    ref = chunk_logits(llm, ids)
    del llm
    x = torch.tensor([ids])
    with torch.no_grad():
        plain = twin(x).logits[0].float().numpy()
        with llamacpp_faithful(twin, types):
            faithful = twin(x).logits[0].float().numpy()
    return {"tokens": len(ids), "plain": compare(ref, plain), "faithful": compare(ref, faithful)}


def write_trained(trained: dict, path: Path, progress: bool = True) -> dict:
    """The trained student (a `qat_run` / `trained_student` result) as a GGUF file, through the
    quantizer it trained with: its learned scales, its frozen tensors' kept bytes, the plan it
    trained under (not recomputed), and its training summary in the provenance keys. The student
    is converted in place (FakeQuantLinears back to Linears holding the latent weights)."""
    from ..export.provenance import training_summary
    from ..prepare import convert, frozen_bytes, scale_cuts

    cfg, student, source = trained["config"], trained["student"], trained["source"]
    cuts = scale_cuts(student)
    if cuts:
        log.warning("%d Q4_0 blocks' learned scales left their blocks without a code 0; the exporter cuts them so that "
                    "llama.cpp re-quantizes the values to the same bytes (training since follows the cut at every step)", cuts)
    scales = convert(student, source.arch)
    return export_model(student, trained["tokenizer"], source, path, cfg.qat.fmt, cfg.qat.pure, q4_0_scales=scales, progress=progress,
                        plan=trained["plan"], raw=frozen_bytes(student, source.arch), training=training_summary(cfg, trained.get("metrics"), cuts))


class GGUFTarget(Target):
    name = "gguf"
    formats = TRAINABLE

    def reference(self, job: Job) -> Path:
        return float_reference(job.source, job.teacher, job.tokenizer)

    def baseline(self, job: Job) -> Path:
        qat = job.cfg.qat
        if qat.plan is not None:
            # a planner's mix: the same per-tensor types quantized without training (qatkit's
            # Q4_0/Q8_0/Q6_K bytes are llama-quantize's, tested), so QAT is compared at equal size
            from ..budget import plan_key
            from ..prepare import model_plan

            path = job.source.cache_dir / f"ptq-plan-{plan_key(qat.plan)}.gguf"
            if not path.exists():
                plan = model_plan(job.teacher, job.source.arch, qat.fmt, plan_file=qat.plan)
                export_model(job.teacher, job.tokenizer, job.source, path, qat.fmt, plan=plan)
            return path
        path = job.source.cache_dir / f"ptq-llama.cpp-{qat.fmt}{'-pure' if qat.pure else ''}.gguf"
        if not path.exists():
            ptq_llama_cpp(job.source, path, qat.fmt, qat.pure, model=job.teacher, tokenizer=job.tokenizer)
        return path

    def export(self, trained: dict, progress: bool = True) -> dict:
        info = write_trained(trained, Path(trained["run_dir"]) / f"qat-{trained['config'].qat.fmt}.gguf", progress)
        trained.update(path=info["path"], gguf=info["path"], file_bytes=info["file_bytes"])
        return trained

    def score(self, job: Job, files: dict[str, Path | None], texts: dict[str, str], chunks: int) -> dict[str, dict[str, dict]]:
        keys = list(files)
        out = {}
        for name, text in texts.items():
            rows = score_files([str(files[k]) for k in keys], text, ref_path=str(files["teacher"]), n_ctx=N_CTX, max_chunks=chunks)
            out[name] = dict(zip(keys, rows))
        return out

    def file_facts(self, job: Job, path: Path) -> dict:
        facts = {k: v for k, v in decode_speed(str(path)).items() if k.endswith("_tps")}
        return {**facts, "load_rss_mb": load_rss_mb(str(path))}

    def verify(self, job: Job, trained: dict, files: dict[str, Path | None], text: str, chunks: int) -> tuple[dict, dict]:
        model, tokenizer = job.teacher, job.tokenizer
        twin, types = file_twin(model, job.source.arch, str(files["qat"]))
        gap = export_gap(twin, types, str(files["qat"]), text)
        gap = {"kld": gap["faithful"]["kld"], "same_top": gap["faithful"]["same_top"], **gap}
        ids = torch.tensor([tokenizer(text[:4000])["input_ids"][:LAYER_TOKENS]])
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # (types also names 3-D expert weights)
        quantized = {n: f for n, f in types.items() if get_format(f).trainable and n != "lm_head" and n in linears}
        ptq_w = {n: get_format(f).fake_quant(model.get_submodule(n).weight) for n, f in quantized.items()}  # == llama.cpp's PTQ values
        qat_w = {n: twin.get_submodule(n).weight for n in quantized}
        return gap, layer_errors(model, ptq_w, qat_w, ids)

    def about(self, cfg) -> dict:
        return {"runtime": "llama.cpp", "file_kind": "GGUF", "title": cfg.qat.fmt.upper() + (" pure" if cfg.qat.pure else ""),
                "labels": {"teacher": "float teacher", "ptq": "PTQ of the same plan" if cfg.qat.plan else "llama.cpp PTQ", "qat": "qatkit QAT"},
                "measured": "All quality figures measured in llama.cpp (perplexity as llama-perplexity computes it)",
                "gap_note": "with llama.cpp's activation roundings modelled"}


TARGET = GGUFTarget()
