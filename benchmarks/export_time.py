"""Where the mobile export's time goes: the same student exported as the usual program (a dynamic
token count, 1..max_context-1, for prefill) and as a one-token program, side by side in one
process, alternating. The model is the default model's architecture and width (Gemma 3 270M's
config) with fewer layers and random weights: export time grows with the graph, not with the
weights, so a few layers show the ratio without the full ~4-minute export.

    python benchmarks/export_time.py [--layers 4] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatkit import quiet_import_noise
    from qatkit.export.executorch import export_pte
    from qatkit.models.load import load, resolve
    from qatkit.prepare import QATConfig, prepare

    quiet_import_noise()
    src = resolve("gemma3-270m")
    _, tok = load(src)
    cfg = AutoConfig.from_pretrained(src.hf_dir)
    cfg.num_hidden_layers = args.layers
    cfg.layer_types = cfg.layer_types[: args.layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prepare(model, src.arch, QATConfig(fmt="mobile", embedding="int4"))
    times: dict[str, list[float]] = {"dynamic": [], "one-token": []}
    info = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            for kind in times:
                t0 = time.perf_counter()
                info[kind] = export_pte(model, tok, Path(d) / f"{kind}.pte", max_context=512, dynamic=kind == "dynamic")
                times[kind].append(time.perf_counter() - t0)
    print(f"Gemma 3 270M's width, {args.layers} layers, random weights; median of {args.rounds} alternated exports")
    print(f"{'program':<12} {'seconds':>8} {'torch.export':>13} {'lowering':>9} {'partitions':>11}")
    for kind, ts in times.items():
        i = info[kind]
        print(f"{kind:<12} {statistics.median(ts):8.1f} {i['export_s']:13.1f} {i['lower_s']:9.1f} {i['xnnpack_partitions']:11d}")
    print(f"ratio dynamic / one-token: {statistics.median(times['dynamic']) / statistics.median(times['one-token']):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
