"""The budget planner for the mobile format on the default model: planned mixes against uniform
precision, measured in ExecuTorch.

Measures the per-tensor sensitivity of Gemma 3 270M for the mobile format once (weight-only KL
rise on the default training text, `qatkit.planner.measure_losses`), plans the given budgets, and
writes each plan as an untrained (PTQ) .pte with qatkit's exporter, beside the two-format
corners: every weight int4, every weight int8, and Linears int8 with an int4 table. The plans
are fitted as `qatkit plan` fits them, the program around the weights measured by exporting it
(`planner.fit_mobile_program`); each file's bytes (.pte and .ptd) are printed against the
planner's prediction of the whole file, and its weights' bytes (constants, named data, .ptd
segments) against the byte rule's. Every program is scored in the ExecuTorch runtime against
the float model in torch on the suite: mean KL and perplexity over its domains, and per domain
(docs is the sensitivity text's own source, CPython's reference prose: in-domain; the mean over
the others is printed apart). Each plan is compared with the best uniform file and the best
corner that are no larger.

    python benchmarks/plan_mobile.py [--budgets 150MB 180MB 220MB] [--chunks 1] [--losses runs/plan_losses_mobile.json]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from plan_budgets import cached_losses, print_verdicts  # (benchmarks/ is on the path when a benchmark runs)

from qatkit import metrics
from qatkit.budget import inventory, parse_size, predicted_loss, save_plan
from qatkit.eval.suite import in_domain, load_suite
from qatkit.models.load import load, resolve
from qatkit.planner import fit_mobile_program, mobile_program_bytes
from qatkit.prepare import QATConfig
from qatkit.runtime.executorch import PteModel, program_bytes, text_tokens, weight_bytes
from qatkit.targets.executorch import ptq_program

N_CTX = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["150MB", "180MB", "220MB"])
    ap.add_argument("--losses", type=Path, default=Path("runs/plan_losses_mobile.json"), help="measured losses are kept here and reused")
    ap.add_argument("--chunks", type=int, default=1, help="chunks of 512 tokens per held-out domain")
    args = ap.parse_args()
    src = resolve("gemma3-270m")
    model, tok = load(src)
    entries = inventory(model, src.arch, "mobile")
    how = cached_losses(entries, model, tok, src.arch, "mobile", args.losses)
    print(f"sensitivity: {how}")

    def uniform(linear: str, table: str) -> dict[str, str]:
        return {e.name: (e.levels[0] if len(e.levels) == 1 else table if e.kind == "table" else linear) for e in entries}

    measured: dict = {}

    def program(choice: dict[str, str]) -> int:
        return mobile_program_bytes(src, model, tok, entries, choice, measured)

    plans = {"uniform int4": uniform("int4", "int4"), "Linears int8, table int4": uniform("int8", "int4"), "uniform int8": uniform("int8", "int8")}
    for b in args.budgets:
        plans[f"planned for {b}"] = fit_mobile_program(entries, parse_size(b), program)[0]
    suite = load_suite()
    teacher = metrics.torch_logits(model.eval())
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for i, (name, plan) in enumerate(plans.items()):
            plan_file = Path(d) / f"{i}.json"
            save_plan(plan_file, "mobile", plan, {})
            out = Path(d) / f"{i}.pte"
            t0 = time.perf_counter()
            ptq_program(src, model, tok, QATConfig(fmt="mobile", plan=str(plan_file)), out)
            rule = sum(e.options[plan[e.name]] for e in entries)
            rows[name] = {"bytes": program_bytes(out), "weights": weight_bytes(out), "rule": rule, "predicted": rule + program(plan),
                          "export_s": time.perf_counter() - t0,
                          "int8_linears": sum(1 for e in entries if e.kind == "linear" and plan[e.name] == "int8"),
                          "table": next(plan[e.name] for e in entries if e.kind == "table"), "predicted_loss": predicted_loss(entries, plan), "kld": [], "nll": []}
            pte = PteModel(out)
            for domain, text in suite.items():
                chunk_list = metrics.chunks([pte.bos, *text_tokens(out, text)], N_CTX, pte.bos, args.chunks, label=domain)
                pte_scores, _ = metrics.score_chunks([pte.scored_logits, teacher], chunk_list, ref_index=1)
                r = pte_scores.result()
                rows[name]["kld"].append(r["kld"])
                rows[name]["nll"].append(r["nll"])
            print(f"  {name}: {rows[name]['bytes']:,} bytes, exported in {rows[name]['export_s']:.0f} s, scored", flush=True)
    print(f"Gemma 3 270M, PTQ mobile programs (.pte and .ptd) scored in ExecuTorch against the float model in torch; held-out suite "
          f"({', '.join(suite)}), {args.chunks} x {N_CTX} tokens each")
    print(f"{'file':<28} {'bytes':>12} {'predicted':>12} {'off':>4} {'weights':>12} {'rule':>12} {'int8 Lin.':>9} {'table':>5} {'pred. loss':>10} "
          f"{'mean KLD':>9} {'PPL':>8}")
    for name, r in rows.items():
        r["mean_kld"] = sum(r["kld"]) / len(r["kld"])
        ppl = math.exp(sum(r["nll"]) / len(r["nll"]))
        print(f"{name:<28} {r['bytes']:>12,} {r['predicted']:>12,} {r['bytes'] - r['predicted']:>4,} {r['weights']:>12,} {r['rule']:>12,} {r['int8_linears']:>9} "
              f"{r['table']:>5} {r['predicted_loss']:>10.4f} {r['mean_kld']:>9.4f} {ppl:>8.3f}")
    seen = [d for d in suite if in_domain(d, ["pydoc"])]  # the sensitivity text is the default training text, CPython's reference prose
    print(f"mean KLD per domain ({', '.join(f'{d} (in-domain: the sensitivity text)' if d in seen else d for d in suite)}), and over the unseen ones:")
    for name, r in rows.items():
        unseen = [k for d, k in zip(suite, r["kld"]) if d not in seen]
        print(f"  {name:<28} " + " ".join(f"{k:8.4f}" for k in r["kld"]) + f"   unseen mean {sum(unseen) / len(unseen):.4f}")
    print_verdicts(rows, args.budgets, {"uniform": "uniform", None: "corner"})

if __name__ == "__main__":
    main()
