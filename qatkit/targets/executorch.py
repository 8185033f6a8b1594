"""The ExecuTorch target: the mobile format as an XNNPACK .pte (channel-wise int4 / int2 / int8
weights, int8 activations), run by the real ExecuTorch runtime.

- reference: none as a file; the float teacher is scored in torch on the same chunks, and is the
  KL reference;
- baseline: the same plan, untrained, as a program (static activation scales calibrated on the
  default training text), cached beside the model by a key of the plan;
- export: the trained student's codes and scales, written as the program computes with them;
- score: perplexity, KL and same-top in ExecuTorch (the teacher runs once per chunk); prefill and
  decode speed from ExecuTorch's own LLM runner;
- verify: the export gap (ExecuTorch on the trained program vs the trained student in torch).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from .. import QatkitError, metrics
from ..budget import plan_key
from ..export.executorch import export_pte
from ..export.provenance import describe, training_summary
from ..prepare import prepare
from ..runtime.executorch import PteModel, generate, program_bytes, require_executorch, score_ids, text_tokens
from ..train.run import calibrate_on_default_text
from . import N_CTX, Job, Target

PLAN_FIELDS = ("mobile_weights", "int2", "int8", "keep", "embedding", "activations")  # QATConfig fields that make the plan
SPEED_PROMPT = "The capital of France is"


def ptq_program(source, model, tokenizer, qat, out: Path, seq_len: int = 256) -> dict:
    """The untrained program of a mobile plan (`qat`, a QATConfig) at `out`: a copy of `model`
    prepared, its static activation scales (if any) calibrated on the default training text in
    sequences of `seq_len`, exported. `model` is left as it was."""
    ptq = copy.deepcopy(model)
    plan = prepare(ptq, source.arch, qat)
    calibrate_on_default_text(ptq, tokenizer, seq_len)
    return export_pte(ptq, tokenizer, out, max_context=qat.max_context, provenance=describe(plan, "mobile", full_plan=False))


def ptq_path(source, qat, seq_len: int) -> Path:
    """Where the untrained program of a mobile plan is cached beside the model."""
    plan_file = plan_key(qat.plan) if qat.plan else None
    plan = json.dumps({**{k: getattr(qat, k) for k in (*PLAN_FIELDS, "max_context")}, "calibration_seq_len": seq_len, "plan_file": plan_file},
                      sort_keys=True, default=list)
    return source.cache_dir / f"ptq-mobile-{hashlib.sha256(plan.encode()).hexdigest()[:12]}.pte"


class ExecuTorchTarget(Target):
    name = "executorch"
    formats = ("mobile",)

    def check(self, cfg) -> None:
        require_executorch()  # before the training, not after it

    def reference(self, job: Job) -> None:
        return None  # the teacher is scored in torch

    def baseline(self, job: Job) -> Path:
        path = ptq_path(job.source, job.cfg.qat, job.cfg.train.seq_len)
        if not path.exists():
            ptq_program(job.source, job.teacher, job.tokenizer, job.cfg.qat, path, job.cfg.train.seq_len)
        return path

    def export(self, trained: dict, progress: bool = True) -> dict:
        cfg = trained["config"]
        training = training_summary(cfg, trained.get("metrics"))
        info = export_pte(trained["student"], trained["tokenizer"], Path(trained["run_dir"]) / "qat-mobile.pte", max_context=cfg.qat.max_context,
                          provenance=describe(trained["plan"], "mobile", training, full_plan=False))
        trained.update(path=info["path"], pte=info["path"], file_bytes=info["file_bytes"])
        return trained

    def score(self, job: Job, files: dict[str, Path | None], texts: dict[str, str], chunks: int) -> dict[str, dict[str, dict]]:
        bos = job.tokenizer.bos_token_id
        ptes = {key: PteModel(path) for key, path in files.items() if path is not None}
        if any(pte.bos != bos for pte in ptes.values()):
            raise QatkitError(f"the programs' BOS ({', '.join(str(p.bos) for p in ptes.values())}) differs from the tokenizer's ({bos})")
        keys = list(ptes)
        first = files[keys[-1]]
        ref = metrics.torch_logits(job.teacher)
        out = {}
        for name, text in texts.items():
            tokens = ([bos] if bos is not None else []) + text_tokens(first, text)
            chunk_list = metrics.chunks(tokens, N_CTX, bos, chunks, label=name)
            # the teacher is the reference and one of the scored models: it runs once per chunk
            scores = metrics.score_chunks([ptes[k].scored_logits for k in keys] + [ref], chunk_list, ref_index=len(keys))
            rows = {"teacher": {**scores[-1].result(), "chunks": len(chunk_list), "n_ctx": N_CTX}}
            for key, sc in zip(keys, scores):
                rows[key] = {"path": str(files[key]), **sc.result(), "chunks": len(chunk_list), "n_ctx": N_CTX}
            out[name] = rows
        return out

    def file_facts(self, job: Job, path: Path) -> dict:
        speed = generate(path, SPEED_PROMPT, n_tokens=64)
        return {"prefill_tps": speed.get("prefill_token_per_sec"), "decode_tps": speed.get("decode_token_per_sec")}

    def file_bytes(self, path: Path) -> int:
        return program_bytes(path)  # the .pte and the shared table's .ptd beside it

    def verify(self, job: Job, trained: dict, files: dict[str, Path | None], text: str, chunks: int) -> tuple[dict, None]:
        student = trained["student"].eval()
        path = files["qat"]
        ids = text_tokens(path, text)
        gap = score_ids(PteModel(path).scored_logits, ids, job.tokenizer.bos_token_id, N_CTX, max_chunks=min(2, chunks),
                        ref_logits=metrics.torch_logits(student), label="export gap")
        return {"kld": gap["kld"], "same_top": gap["same_top"], "tokens": gap["tokens"]}, None

    def about(self, cfg) -> dict:
        return {"runtime": "ExecuTorch (XNNPACK)", "file_kind": ".pte", "title": "mobile format (ExecuTorch / XNNPACK)",
                "labels": {"teacher": "float teacher (torch)", "ptq": "PTQ .pte", "qat": "qatkit QAT .pte"},
                "measured": "Perplexity of the .pte files measured in the ExecuTorch runtime (the teacher and the KL reference in torch, on the same chunks)",
                "plan": {k: getattr(cfg.qat, k) for k in PLAN_FIELDS}}


TARGET = ExecuTorchTarget()
