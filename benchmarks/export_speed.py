"""Q4_0 export speed on the default model, side by side with gguf-py and llama.cpp's quantizer.

Three quantizers on the same tensors (the decoder linears the Q4_0 mix puts at Q4_0, plus the
tied embedding at Q8_0), alternated over several rounds in one process (the machine is noisy):
- qatkit.formats (torch, what fake-quant and export share);
- gguf.quants.quantize (numpy; bit-identical reference);
- ggml's own ggml_quantize_chunk (C, one thread: the per-tensor work of llama-quantize).
Then whole files: `qatkit export` (load excluded) vs llama.cpp's llama_model_quantize on the F32
reference, both from warm caches. Prints seconds, MB/s (float32 input) and ratios.

    python benchmarks/export_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qatkit.export.gguf import export_model, gguf_tensors
from qatkit.formats import encode
from qatkit.models.load import load, resolve
from qatkit.plan import default_plan
from qatkit.runtime.ggml import ggml_quantize
from qatkit.runtime.llamacpp import llama_quantize
from qatkit.targets.gguf import float_reference


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    source = resolve("gemma3-270m")
    model, tokenizer = load(source)
    tensors = gguf_tensors(model, source.arch)
    plan = default_plan({k: tuple(v.shape) for k, v in tensors.items()}, "q4_0")
    work = [(tensors[k], fmt) for k, fmt in plan.items() if fmt in ("q4_0", "q8_0")]
    arrays = [(w.numpy(), fmt) for w, fmt in work]
    mb = sum(w.numel() * 4 for w, _ in work) / 1e6
    qtype = {"q4_0": T.Q4_0, "q8_0": T.Q8_0}
    runners = {
        "qatkit": lambda: [encode(w, fmt) for w, fmt in work],
        "gguf-py": lambda: [gq.quantize(a, qtype[fmt]) for a, fmt in arrays],
        "ggml C (1 thread)": lambda: [ggml_quantize(a, int(qtype[fmt])) for a, fmt in arrays],
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            times[name].append(timed(fn))
    print(f"tensors: {len(work)} ({sum(f == 'q4_0' for _, f in work)} q4_0, {sum(f == 'q8_0' for _, f in work)} q8_0), {mb:.0f} MB float32; torch threads {torch.get_num_threads()}; median of {args.rounds} rounds")
    base = statistics.median(times["qatkit"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<18} {m:7.2f} s  {mb / m:8.1f} MB/s  qatkit/this = {base / m:5.2f}x")

    ref = float_reference(source, model, tokenizer)
    with tempfile.TemporaryDirectory() as d:
        file_times: dict[str, list[float]] = {"qatkit export": [], "llama_model_quantize": []}
        for _ in range(args.rounds):
            file_times["qatkit export"].append(timed(lambda: export_model(model, tokenizer, source, os.path.join(d, "q.gguf"), "q4_0", progress=False)))
            file_times["llama_model_quantize"].append(timed(lambda: llama_quantize(str(ref), os.path.join(d, "l.gguf"), "q4_0")))
        size = os.path.getsize(os.path.join(d, "q.gguf")) / 1e6
    print(f"whole file (Q4_0 mix, {size:.0f} MB out, model already loaded):")
    base = statistics.median(file_times["qatkit export"])
    for name, ts in file_times.items():
        m = statistics.median(ts)
        print(f"  {name:<22} {m:7.2f} s  qatkit/this = {base / m:5.2f}x")


if __name__ == "__main__":
    main()
