"""The mobile format on the default model, measured in the ExecuTorch runtime (XNNPACK, CPU).

PTQ (the format without training: searched bf16 channel scales) vs QAT (the same plan trained
with the same distillation as the GGUF path), both written as .pte programs with a KV cache and
scored in ExecuTorch the way llama-perplexity scores a GGUF: perplexity, mean KL to the float
teacher (computed in torch, the same chunks and positions), same top token, gap closure, the
.pte size, and prefill/decode tokens/s through ExecuTorch's own LLM runner. The export gap of
the trained file (ExecuTorch vs the student's own forward) is printed too.

    python benchmarks/mobile.py [--steps 150] [--int2 '*.mlp.down_proj'] [--activations static] [--out runs/mobile]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from qatkit.eval.executorch import PteModel, generate, score_ids, text_tokens, torch_logits
from qatkit.export.executorch import export_pte
from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig, calibrate_static, prepare
from qatkit.train.data import default_eval_text, default_train_texts, pack
from qatkit.train.loop import TrainConfig
from qatkit.train.run import CALIBRATION_SEQS, RunConfig, qat_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--int2", nargs="*", default=[])
    ap.add_argument("--embedding", default="int8")
    ap.add_argument("--activations", default="dynamic", choices=["dynamic", "static"])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/mobile"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    source = resolve("gemma3-270m")
    teacher, tokenizer = load(source)
    qat_cfg = QATConfig(fmt="mobile", mobile_weights=args.weights, int2=tuple(args.int2), embedding=args.embedding, learn_scales=True, activations=args.activations)

    ptq_path = args.out / "ptq-mobile.pte"
    if not ptq_path.exists():
        ptq = copy.deepcopy(teacher)
        prepare(ptq, source.arch, qat_cfg)
        calibrate_static(ptq, pack(tokenizer, default_train_texts(), 256, vocab_size=teacher.config.vocab_size)[:CALIBRATION_SEQS])
        export_pte(ptq, tokenizer, ptq_path)
        del ptq
    train = TrainConfig(steps=args.steps, lr=args.lr, eval_every=25, ckpt_every=25)
    run = qat_run(RunConfig(model="gemma3-270m", qat=qat_cfg, train=train), args.out / "train", resume=True, loaded=(source, teacher, tokenizer))
    student = run.pop("student")
    qat_path = Path(run["pte"])

    text = default_eval_text()
    ids = text_tokens(qat_path, text)
    bos = tokenizer.bos_token_id
    teacher_logits = torch_logits(teacher)
    rows = {"teacher": score_ids(teacher_logits, ids, bos, max_chunks=args.chunks, label="teacher")}
    for key, path in (("ptq", ptq_path), ("qat", qat_path)):
        pte = PteModel(path)
        rows[key] = {"path": str(path), "file_bytes": path.stat().st_size, **score_ids(pte.logits, ids, pte.bos, max_chunks=args.chunks, ref_logits=teacher_logits, label=str(path))}
        speed = generate(path, "The capital of France is", n_tokens=64)
        rows[key].update({k: speed.get(k) for k in ("prefill_token_per_sec", "decode_token_per_sec")}, sample=speed["text"][:80])
    # the export gap: the runtime vs the trained student's own forward, first 2 chunks
    gap = score_ids(PteModel(qat_path).logits, ids, bos, max_chunks=2, ref_logits=torch_logits(student.eval()), label="gap")
    closure = (rows["ptq"]["ppl"] - rows["qat"]["ppl"]) / (rows["ptq"]["ppl"] - rows["teacher"]["ppl"])
    result = {"rows": rows, "gap_closure": closure, "export_gap": {"kld": gap["kld"], "same_top": gap["same_top"]}, "steps": args.steps,
              "train_seconds": run["train_seconds"], "plan": {"weights": args.weights, "int2": args.int2, "embedding": args.embedding, "activations": args.activations}, "wall_s": time.time() - t_all}
    (args.out / "mobile.json").write_text(json.dumps(result, indent=2))

    acts = "static int8 activations (per tensor, learned)" if args.activations == "static" else "int8 activations per token"
    print(f"\nGemma 3 270M, mobile format ({args.weights} Linears, int2: {args.int2 or 'none'}, embedding {args.embedding} per row), {acts}")
    print(f"{args.steps} QAT steps in {run['train_seconds']:.0f} s; held-out: {rows['teacher']['tokens']} tokens of CPython's pydoc prose, scored in ExecuTorch (teacher in torch)")
    print(f"{'file':<24} {'PPL':>8} {'KLD':>8} {'same top':>9} {'MB':>7} {'prefill t/s':>12} {'decode t/s':>11}")
    for key, label in (("teacher", "float teacher (torch)"), ("ptq", "PTQ .pte"), ("qat", "QAT .pte")):
        r = rows[key]
        kld = "-" if r.get("kld") is None else f"{r['kld']:.4f}"
        top = "-" if r.get("same_top") is None else f"{r['same_top']:.2f}%"
        mb = f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-"
        pf = f"{r['prefill_token_per_sec']:.1f}" if r.get("prefill_token_per_sec") else "-"
        dc = f"{r['decode_token_per_sec']:.1f}" if r.get("decode_token_per_sec") else "-"
        print(f"{label:<24} {r['ppl']:8.3f} {kld:>8} {top:>9} {mb:>7} {pf:>12} {dc:>11}")
    print(f"gap closure: {closure:.1%}")
    print(f"export gap (ExecuTorch vs the trained student): mean KLD {gap['kld']:.2e}, same top {gap['same_top']:.2f}%")
    print(f"QAT sample: {rows['qat']['sample']!r}")


if __name__ == "__main__":
    main()
