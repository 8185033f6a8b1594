"""The budget planner on the default model: planned mixes against uniform precision, in llama.cpp.

Measures the per-tensor sensitivity of Gemma 3 270M once (qatkit.budget.measure_losses), plans
three budgets with it, writes each plan's GGUF with qatkit's exporter (PTQ: no training; the
Q4_0/Q8_0 bytes are llama.cpp's quantizer's) and checks the file's size against the prediction
to the byte. The reference files: uniform precision (every quantizable tensor Q4_0, or every one
Q8_0: `llama-quantize --pure`), llama.cpp's default Q4_0 mix (decoder Linears Q4_0, the tied
embedding Q8_0), and the other two-format corner (Linears Q8_0, embedding Q4_0). Every file is
scored in llama.cpp against the float F32 file on the held-out suite (text unlike the
sensitivity text, which is the default training text): mean KL and perplexity over the domains.
Each plan is compared with the best reference file that is no larger.

    python benchmarks/plan_budgets.py [--budgets 180MB 200MB 241.4MB] [--chunks 2] [--losses runs/plan_losses.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from qatkit.budget import fit, human, inventory, parse_size, predicted_loss
from qatkit.eval.suite import load_suite
from qatkit.export.gguf import export_model, file_bytes, file_metadata
from qatkit.models.load import load, resolve
from qatkit.planner import measure_losses
from qatkit.runtime.llamacpp import score_files
from qatkit.targets.gguf import float_reference
from qatkit.train.data import default_train_texts, pack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["180MB", "200MB", "241.4MB"])
    ap.add_argument("--losses", type=Path, default=Path("runs/plan_losses.json"), help="measured losses are kept here and reused")
    ap.add_argument("--chunks", type=int, default=2, help="chunks of 512 tokens per held-out domain")
    args = ap.parse_args()
    src = resolve("gemma3-270m")
    model, tok = load(src)
    entries = inventory(model, src.arch, "q4_0")
    shapes = {e.name: e.shape for e in entries}
    meta = file_metadata(src, model, tok, {e.name: e.levels[0] for e in entries})  # (the provenance key holds a fixed-length plan digest)
    how = cached_losses(entries, model, tok, src.arch, "q4_0", args.losses)
    print(f"sensitivity: {how}")
    overhead = file_bytes(meta, {e.name: e.levels[0] for e in entries}, shapes, "q4_0") - sum(e.options[e.levels[0]] for e in entries)

    def uniform(linear: str, table: str) -> dict[str, str]:
        return {e.name: (e.levels[0] if len(e.levels) == 1 else table if e.kind == "table" else linear) for e in entries}

    plans = {"uniform Q4_0 (--pure)": uniform("q4_0", "q4_0"), "llama.cpp default Q4_0 mix": uniform("q4_0", "q8_0"),
             "Linears Q8_0, embedding Q4_0": uniform("q8_0", "q4_0"), "uniform Q8_0 (--pure)": uniform("q8_0", "q8_0")}
    for b in args.budgets:
        choice, total = fit(entries, parse_size(b), overhead)
        plans[f"planned for {b}"] = choice
    ref = float_reference(src, model, tok)
    suite = load_suite()
    with tempfile.TemporaryDirectory() as d:
        files, rows = {}, {}
        for name, plan in plans.items():
            path = Path(d) / f"{len(files)}.gguf"
            info = export_model(model, tok, src, path, "q4_0", plan=plan, progress=False)
            predicted = file_bytes(meta, plan, shapes, "q4_0")
            if info["file_bytes"] != predicted:
                raise SystemExit(f"{name}: file {info['file_bytes']} bytes, predicted {predicted}")
            files[name] = path
            rows[name] = {"bytes": info["file_bytes"], "q8_linears": sum(1 for e in entries if e.kind == "linear" and plan[e.name] == "q8_0"),
                          "table": next(plan[e.name] for e in entries if e.kind == "table"), "predicted_loss": predicted_loss(entries, plan),
                          "kld": [], "nll": []}
        for domain, text in suite.items():
            for name, r in zip(files, score_files(list(files.values()), text, ref_path=ref, n_ctx=512, max_chunks=args.chunks)):
                rows[name]["kld"].append(r["kld"])
                rows[name]["nll"].append(r["nll"])
    print(f"Gemma 3 270M, PTQ GGUF files scored in llama.cpp against the F32 file; held-out suite ({', '.join(suite)}), "
          f"{args.chunks} x 512 tokens each; every file's size equalled the planner's prediction to the byte")
    print(f"{'file':<40} {'bytes':>12} {'Q8_0 Linears':>12} {'embedding':>9} {'pred. loss':>10} {'mean KLD':>9} {'PPL':>8}")
    for name, r in rows.items():
        r["mean_kld"] = sum(r["kld"]) / len(r["kld"])
        ppl = math.exp(sum(r["nll"]) / len(r["nll"]))
        print(f"{name:<40} {r['bytes']:>12,} {r['q8_linears']:>12} {r['table']:>9} {r['predicted_loss']:>10.4f} {r['mean_kld']:>9.4f} {ppl:>8.3f}")
    print_verdicts(rows, args.budgets, {"uniform": "uniform", None: "reference"})


def cached_losses(entries, model, tok, arch, fmt: str, path: Path) -> str:
    """The entries' measured losses, read from `path` or measured once (the model is restored)
    and kept there; returns how they were measured."""
    if path.exists():
        saved = json.loads(path.read_text())
        for e in entries:
            e.loss = saved["losses"][e.name]
        return saved["how"] + f" (read from {path})"
    t0 = time.perf_counter()
    ids = pack(tok, default_train_texts(), 256, vocab_size=model.config.vocab_size)[-1:]
    how = measure_losses(entries, model, arch, fmt, ids) + f"; {time.perf_counter() - t0:.0f} s"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"how": how, "losses": {e.name: e.loss for e in entries}}))
    return how


def print_verdicts(rows: dict[str, dict], budgets: list[str], kinds: dict) -> None:
    """Each "planned for B" row against the best row of each kind (a name prefix, None: any)
    that fits B, by mean KLD."""
    for b in budgets:
        name = f"planned for {b}"
        r = rows[name]
        for kind, word in kinds.items():
            fitting = [n for n in rows if not n.startswith("planned") and (kind is None or n.startswith(kind)) and rows[n]["bytes"] <= parse_size(b)]
            if not fitting:
                print(f"{name}: no {word} file fits {b}")
                continue
            best = min(fitting, key=lambda n: rows[n]["mean_kld"])
            u = rows[best]
            verdict = "beats" if r["mean_kld"] < u["mean_kld"] else "ties with" if r["mean_kld"] == u["mean_kld"] else "does NOT beat"
            print(f"{name} ({human(r['bytes'])}) {verdict} the best {word} file within the budget, "
                  f"{best} ({human(u['bytes'])}): KLD {r['mean_kld']:.4f} vs {u['mean_kld']:.4f}")


if __name__ == "__main__":
    main()
