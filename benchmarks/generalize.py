"""Which training recipe makes the QAT gain hold on text the training never saw?

For each candidate recipe (training text mix, share of teacher-sampled sequences, loss positions,
steps) this trains a Q4_0 student of the default model and exports it, then scores every QAT
file beside the float teacher and llama.cpp's own PTQ on each domain of the held-out suite, in
llama.cpp (the reference runs once per chunk for the three files). It prints one table:
gap closure per domain, the held-out mean and worst, the in-domain figure apart, QAT's KLD as a
share of PTQ's, and the wall time of training (sampling included).

    python benchmarks/generalize.py [--recipes A B ...] [--chunks 4] [--out runs/generalize]

Runs resume: a recipe whose training finished is not trained again, one already scored (at the
same --chunks) not scored again, so recipes can be run one invocation at a time and tabled
together. The JSON of every figure goes to OUT/generalize.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from qatkit.eval.suite import domain_row, held_out_texts, in_domain, load_suite, summarize
from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig
from qatkit.runtime.llamacpp import score_files
from qatkit.targets import export_trained
from qatkit.targets.gguf import float_reference, ptq_llama_cpp
from qatkit.train.loop import TrainConfig
from qatkit.train.run import RunConfig, qat_run

# name: (description, RunConfig fields, TrainConfig fields)
RECIPES = {
    "pydoc": ("CPython reference prose only (the earlier default)", dict(data=["pydoc"]), {}),
    "docs+code": ("pydoc prose + CPython stdlib source", dict(data=["pydoc", "code"]), {}),
    "mix-1/3": ("docs+code, 1/3 of the sequences sampled from the teacher", dict(data=["pydoc", "code"], data_free=1 / 3), {}),
    "sampled": ("sequences sampled from the teacher only (LLM-QAT)", dict(data_free=1.0), {}),
    "mix-2/3": ("docs+code, 2/3 sampled from the teacher", dict(data=["pydoc", "code"], data_free=2 / 3), {}),
    "mix-1/3-allpos": ("mix-1/3 with KL on every position, 75 steps (same time)", dict(data=["pydoc", "code"], data_free=1 / 3), dict(steps=75, kl_positions=1.0)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["pydoc", "docs+code", "mix-1/3", "sampled"], choices=list(RECIPES))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--chunks", type=int, default=4, help="512-token chunks scored per domain")
    ap.add_argument("--out", type=Path, default=Path("runs/generalize"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    source = resolve("gemma3-270m")
    model, tokenizer = load(source)
    teacher = str(float_reference(source, model, tokenizer))
    ptq = source.cache_dir / "ptq-llama.cpp-q4_0.gguf"
    if not ptq.exists():
        ptq_llama_cpp(source, ptq, "q4_0", False, model=model, tokenizer=tokenizer)
    texts = load_suite()

    runs, table = {}, {}
    for name in args.recipes:
        _, fields, train_fields = RECIPES[name]
        train = TrainConfig(**{"steps": args.steps, "eval_every": 25, "ckpt_every": 50, **train_fields})
        cfg = RunConfig(model="gemma3-270m", qat=QATConfig(), train=train, **fields)
        run_dir = args.out / name.replace("/", "_")
        done, scores = run_dir / "train" / "done.json", run_dir / f"scores-{args.chunks}.json"
        if done.exists():
            runs[name] = json.loads(done.read_text())
        else:
            t0 = time.time()
            result = export_trained(qat_run(cfg, run_dir / "train", resume=True, loaded=(source, model, tokenizer), watch_texts=held_out_texts(texts, cfg.train_sources)))
            runs[name] = {"gguf": result["gguf"], "seconds": round(time.time() - t0, 1), "steps": cfg.train.steps, "sources": cfg.train_sources}
            done.write_text(json.dumps(runs[name]))
            del result
        if scores.exists():
            table[name] = json.loads(scores.read_text())
            continue
        # each recipe scored beside the teacher and the PTQ file (deterministic: the same figures
        # for those two in every recipe's scoring)
        table[name] = {}
        for dom, text in texts.items():
            rows = score_files([teacher, str(ptq), runs[name]["gguf"]], text, ref_path=teacher, max_chunks=args.chunks)
            table[name][dom] = domain_row(dict(zip(("teacher", "ptq", "qat"), rows)), in_domain(dom, runs[name]["sources"]))
        scores.write_text(json.dumps(table[name], indent=2))
        s = summarize(table[name])
        print(f"{name}: held-out mean gap closure {s['gap_closure']:.1%} (worst {s['gap_closure_min']:.1%}), {runs[name]['seconds']:.0f} s", flush=True)
    summaries = {n: summarize(table[n]) for n in args.recipes}
    (args.out / "generalize.json").write_text(json.dumps({"runs": runs, "domains": table, "summaries": summaries}, indent=2, default=str))

    doms = list(texts)
    t0 = table[args.recipes[0]]
    print(f"\nGemma 3 270M, Q4_0 (llama.cpp's mix), scored in llama.cpp: {args.chunks} chunks of 512 per domain ({t0[doms[0]]['teacher']['tokens']} scored tokens each)")
    print("PPL teacher / llama.cpp PTQ: " + ", ".join(f"{d} {t0[d]['teacher']['ppl']:.2f} / {t0[d]['ptq']['ppl']:.2f}" for d in doms))
    head = f"{'recipe':<16} " + " ".join(f"{d:>9}" for d in doms) + f" {'mean':>7} {'worst':>7} {'KLD q/p':>8} {'train s':>8}"
    print(head)
    print("-" * len(head))
    for name in args.recipes:
        s = summaries[name]
        cells = [f"{100 * table[name][d]['gap_closure']:8.1f}{'*' if table[name][d]['in_domain'] else ' '}" for d in doms]
        print(f"{name:<16} " + " ".join(cells) + f" {100 * s['gap_closure']:6.1f}% {100 * s['gap_closure_min']:6.1f}% {s['kld_ratio']:8.3f} {runs[name]['seconds']:8.0f}")
    print("gap closure % per domain; * in-domain (the recipe trains on that corpus), left out of mean and worst")
    for name in args.recipes:
        print(f"  {name}: {RECIPES[name][0]}")


if __name__ == "__main__":
    main()
