"""Where the mobile export's time goes, two exports of the same student side by side in one
process, alternating:

- `--pair length` (default): the usual program (a dynamic token count, 1..max_context-1, for
  prefill) against a one-token program;
- `--pair passes`: qatkit's lean lowering (one decomposition of the program where ExecuTorch
  makes three, only the XNNPACK passes that find something to rewrite in a partition) against
  the whole pipeline; the files must be byte-identical.

The model is the default model's architecture and width (Gemma 3 270M's config) with --layers of
its layers (18: all of them) and random weights: export time grows with the graph, not with the
weights, so a few layers show the ratio without the full export.

    python benchmarks/export_time.py [--pair length|passes] [--layers 4] [--rounds 1]
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
    ap.add_argument("--pair", choices=["length", "passes"], default="length")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatkit import quiet_import_noise
    from qatkit.export.executorch import export_pte
    from qatkit.models.load import load, resolve
    from qatkit.prepare import QATConfig, prepare
    from qatkit.runtime.executorch import data_path

    quiet_import_noise()
    src = resolve("gemma3-270m")
    _, tok = load(src)
    cfg = AutoConfig.from_pretrained(src.hf_dir)
    cfg.num_hidden_layers = args.layers
    cfg.layer_types = cfg.layer_types[: args.layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prepare(model, src.arch, QATConfig(fmt="mobile", embedding="int4"))
    kinds = {"dynamic": {}, "one-token": {"dynamic": False}} if args.pair == "length" else {"lean": {}, "whole pipeline": {"lean": False}}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    info, files = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            for kind, kw in kinds.items():
                out = Path(d) / f"{kind.replace(' ', '-')}.pte"
                t0 = time.perf_counter()
                info[kind] = export_pte(model, tok, out, max_context=512, **kw)
                times[kind].append(time.perf_counter() - t0)
                files[kind] = out.read_bytes() + (data_path(out).read_bytes() if data_path(out).exists() else b"")
    print(f"Gemma 3 270M's width, {args.layers} layers, random weights; median of {args.rounds} alternated exports")
    print(f"{'program':<15} {'seconds':>8} {'torch.export':>13} {'lowering':>9} {'partitions':>11}")
    for kind, ts in times.items():
        i = info[kind]
        print(f"{kind:<15} {statistics.median(ts):8.1f} {i['export_s']:13.1f} {i['lower_s']:9.1f} {i['xnnpack_partitions']:11d}")
    a, b = kinds
    print(f"ratio {a} / {b}: {statistics.median(times[a]) / statistics.median(times[b]):.2f}x")
    if args.pair == "passes":
        print("the two programs (.pte and .ptd) are " + ("byte-identical" if files[a] == files[b] else "DIFFERENT"))


if __name__ == "__main__":
    sys.exit(main())
