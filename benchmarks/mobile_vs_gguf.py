"""The mobile program against the Q4_0 GGUF in llama.cpp, side by side on this machine.

For the default model (Gemma 3 270M): exports the mobile program (int4 Linears per channel, the
embedding per row in int4 by default, int8 activations per token; untrained: speed and size do
not depend on training) with qatkit's exporter in a child process, timing it and taking its peak
resident memory; then alternates, in fresh processes with the same thread count, ExecuTorch on
the .pte and llama.cpp on its own PTQ Q4_0 file: a prefill of the same prompt ids (held-out
text by default), then single-token decode steps, and the process's peak resident memory above
what it held before loading. Prints medians and ratios (.pte / GGUF).

    python benchmarks/mobile_vs_gguf.py [--embedding int4] [--rounds 3] [--prompt 128] [--tokens 64]
                                        [--pte existing.pte | --save keep.pte] [--threads 2] [--one-file]
                                        [--ids text|random] [--head-piece-mb 16]

The tied table is stored once, in a .ptd beside the .pte (sizes are of both files together);
--one-file exports it twice inside one .pte, as before. The program is measured twice: as
ExecuTorch's Python runtime loads it (mlock'ing what it maps, as root), and as an app does,
where the lock is not allowed (setpriv / prlimit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qatkit.runtime.executorch import data_path, program_bytes

EXPORT = """
import json, resource, sys, time
from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig, prepare
from qatkit.export.executorch import export_pte
src = resolve("gemma3-270m")
model, tok = load(src)
floats = sum(p.numel() for p in model.parameters()) * 4
prepare(model, src.arch, QATConfig(fmt="mobile", embedding=sys.argv[2]))
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak of loading and preparing
resident = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM: the peak below is the export's own
t0 = time.perf_counter()
info = export_pte(model, tok, sys.argv[1], max_context=512, share_table=sys.argv[3] == "shared", head_chunk_bytes=int(float(sys.argv[4]) * 2**20))
info["wall_s"] = time.perf_counter() - t0
info["peak_rss"] = status("VmHWM")
info["rss_at_export"] = resident
info["rss_before_export"] = before
info["float32_bytes"] = floats
print("RESULT " + json.dumps({k: v for k, v in info.items() if k != "outside_xnnpack"}))
"""

RUN = """
import json, os, sys, time
import numpy as np
kind, path, n_prompt, n_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
ids = json.load(open(sys.argv[6]))[: n_prompt + n_tokens]
if kind == "pte":
    import torch
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime
    from pathlib import Path
    torch.set_num_threads(threads)
    before = status("VmRSS")
    ptd = Path(path).with_suffix(".ptd")  # the shared table, where the program has one
    method = Runtime.get().load_program(Path(path), data_path=ptd if ptd.exists() else None).load_method("forward")
    loaded, locked = status("VmRSS") - before, status("VmLck")
    def run(tokens, pos):
        return method.execute([torch.tensor([tokens]), torch.tensor([pos])])[0]
    run(ids[:8], 0)  # warm-up
    t0 = time.perf_counter(); run(ids[:n_prompt], 0); t1 = time.perf_counter()
    for i in range(n_tokens):
        run([ids[n_prompt + i]], n_prompt + i)
    t2 = time.perf_counter()
else:
    import llama_cpp
    from qatkit.runtime.llamacpp import open_model
    before = status("VmRSS")
    llm = open_model(path, n_ctx=n_prompt + n_tokens, n_threads=threads, logits_all=False)
    loaded, locked = status("VmRSS") - before, status("VmLck")
    llm.eval(ids[:8]); llm.reset()
    t0 = time.perf_counter(); llm.eval(ids[:n_prompt]); llama_cpp.llama_synchronize(llm.ctx); t1 = time.perf_counter()
    for i in range(n_tokens):
        llm.eval([ids[n_prompt + i]])
    llama_cpp.llama_synchronize(llm.ctx); t2 = time.perf_counter()
print("RESULT " + json.dumps({"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_tokens / (t2 - t1), "rss": status("VmHWM") - before, "loaded": loaded, "locked": locked}))
"""


# As a phone app loads a program: ExecuTorch maps its files with mlock where it is allowed (the
# Python bindings and the LLM runner ask for MmapUseMlockIgnoreErrors), which locks the whole
# lookup table in memory for a root process; an app's RLIMIT_MEMLOCK (64 KiB on Android) makes
# the lock fail and the runtime go on without it. This runs the child so: no CAP_IPC_LOCK, no
# lockable memory.
AS_APP = (["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"] if os.geteuid() == 0 else []) + ["prlimit", "--memlock=0:0", "--"]


def child(code: str, *args, env=None, prefix: list[str] | None = None) -> dict:
    out = subprocess.run([*(prefix or []), sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def prompt_ids(kind: str, n: int) -> list[int]:
    """n ids for both runtimes: uniform random over the vocabulary (as before 2026-12-06), or the
    default model's tokens of the held-out suite, n/4 consecutive ones from each unseen domain."""
    if kind == "random":
        import numpy as np

        return np.random.default_rng(0).integers(100, 200000, n).tolist()
    from transformers import AutoTokenizer

    from qatkit.eval.suite import load_suite
    from qatkit.models.load import resolve

    tok = AutoTokenizer.from_pretrained(resolve("gemma3-270m").hf_dir)
    texts = [tok(t)["input_ids"] for dom, t in load_suite().items() if dom != "docs"]
    per = -(-n // len(texts))
    return [i for t in texts for i in t[1 : 1 + per]][:n]  # past each text's first token (the BOS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedding", default="int4", choices=["int4", "int8"])
    ap.add_argument("--pte", type=Path, help="measure this program instead of exporting one")
    ap.add_argument("--gguf", type=Path, help="the Q4_0 GGUF (default: llama.cpp's PTQ of the default model, made if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ids", choices=["text", "random"], default="text",
                    help="the prompt and decoded ids: held-out text (48 consecutive tokens of each of the four unseen domains, "
                         "the default) or uniform random ids over the vocabulary (which fault in more of the lookup table)")
    ap.add_argument("--save", type=Path, help="keep the exported program here (to measure it again with --pte)")
    ap.add_argument("--head-piece-mb", type=float, default=16.0,
                    help="the tied head's rows per XNNPACK delegate, in MiB of codes (qatkit's default 16; a large value: one delegate)")
    ap.add_argument("--one-file", action="store_true", help="the tied table twice in one .pte (the lookup's and XNNPACK's), not once in a .ptd beside it")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as d:
        pte = args.pte
        if pte is None:
            pte = args.save or Path(d) / "mobile.pte"
            e = child(EXPORT, pte, args.embedding, "one-file" if args.one_file else "shared", str(args.head_piece_mb), env=env)
            print(f"export of one program: {e['wall_s']:.0f} s (torch.export {e['export_s']:.0f} s, lowering {e['lower_s']:.0f} s), "
                  f"{e['xnnpack_partitions']} XNNPACK partitions (the head in {e.get('head_pieces', 1)}); peak RSS while exporting "
                  f"{e['peak_rss'] / 1e9:.2f} GB = {e['peak_rss'] / e['float32_bytes']:.2f}x the model's float32 size ({e['float32_bytes'] / 1e9:.2f} GB), "
                  f"from {e['rss_at_export'] / 1e9:.2f} GB resident when it began (loading and preparing peaked at {e['rss_before_export'] / 1e9:.2f} GB)")
        gguf = args.gguf
        if gguf is None:
            from qatkit.models.load import resolve
            from qatkit.targets.gguf import ptq_llama_cpp

            src = resolve("gemma3-270m")
            gguf = src.cache_dir / "ptq-llama.cpp-q4_0.gguf"
            if not gguf.exists():
                ptq_llama_cpp(src, gguf, "q4_0")
        ids_file = Path(d) / "ids.json"
        ids_file.write_text(json.dumps(prompt_ids(args.ids, args.prompt + args.tokens)))
        app = all(shutil.which(c) for c in AS_APP if c != "--" and not c.startswith("-"))
        rows: dict[str, list[dict]] = {"pte": [], "gguf": [], **({"app": []} if app else {})}
        for _ in range(args.rounds):
            for kind, path in (("pte", pte), ("gguf", gguf), *((("app", pte),) if app else ())):
                rows[kind].append(child(RUN, "gguf" if kind == "gguf" else "pte", path, args.prompt, args.tokens, args.threads, ids_file, env=env,
                                        prefix=AS_APP if kind == "app" else None))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill_tps", "decode_tps", "rss", "loaded", "locked")} for k, v in rows.items()}
        size = {"pte": program_bytes(pte), "app": program_bytes(pte), "gguf": gguf.stat().st_size}
        what = "random token ids" if args.ids == "random" else "tokens of held-out text"
        print(f"{args.threads} threads; prompt of {args.prompt} {what}, then {args.tokens} single-token steps; "
              f"median of {args.rounds} alternated rounds, each a fresh process")
        print(f"{'':<28} {'size MB':>9} {'prefill t/s':>12} {'decode t/s':>11} {'peak RSS MB':>12}")
        files = ".pte+.ptd" if data_path(pte).exists() else ".pte"
        labels = {"pte": f"mobile {files} (emb {args.embedding})", "app": "  the same, loaded as an app", "gguf": "llama.cpp PTQ Q4_0 GGUF"}
        for kind in rows:
            m = med[kind]
            print(f"{labels[kind]:<28} {size[kind] / 1e6:9.1f} {m['prefill_tps']:12.1f} {m['decode_tps']:11.1f} {m['rss'] / 1e6:12.1f}")
        g = med["gguf"]
        for kind, label in (("pte", "ratio .pte / GGUF"), ("app", "  as an app / GGUF")):
            if kind in med:
                p = med[kind]
                print(f"{label:<28} {size[kind] / size['gguf']:9.2f}x {p['prefill_tps'] / g['prefill_tps']:11.2f}x "
                      f"{p['decode_tps'] / g['decode_tps']:10.2f}x {p['rss'] / g['rss']:11.2f}x")
        print("targets: size <= 0.55x, prefill and decode >= 1.00x, peak RSS <= 0.60x")
        if not app:
            print("(not measured as an app: setpriv / prlimit missing)")
        for kind, label in (("pte", "ExecuTorch"), ("app", "ExecuTorch as an app (no mlock)"), ("gguf", "llama.cpp")):
            if kind not in med:
                continue
            m = med[kind]
            print(f"{label}: resident after load {m['loaded'] / 1e6:.1f} MB, of which locked in memory (mlock) {m['locked'] / 1e6:.1f} MB; peak {m['rss'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
