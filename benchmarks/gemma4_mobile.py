"""Gemma 4's per-layer embedding table in the mobile program: the E-style tiny model (tests'
tiny_gemma4, 6 layers, the last 2 reusing K/V) exported with the table per row in int8, int4 and
int2; prints each .pte's bytes, the difference the planner's byte rule predicts from the int8
program, and the program's agreement with its student in ExecuTorch (max |logit difference| /
max |logit| over 40 positions, token by token). Then the planner's sizes for Gemma 4 E2B's text
decoder (config only): the smallest mobile program, with the per-layer table at int2.

    python benchmarks/gemma4_mobile.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import torch

    from qatkit import quiet_import_noise
    from qatkit.budget import mobile_bytes
    from qatkit.export.executorch import export_pte
    from qatkit.models.arch import arch_for_config
    from qatkit.prepare import QATConfig, prepare
    from qatkit.runtime.executorch import PteModel
    from tiny_models import gemma_tokenizer, tiny_gemma4

    quiet_import_noise()
    sizes, shape = {}, None
    with tempfile.TemporaryDirectory() as d:
        for table in ("int8", "int4", "int2"):
            m = tiny_gemma4(0)
            prepare(m, arch_for_config(m.config), QATConfig(fmt="mobile", per_layer_embedding=table))
            shape = tuple(m.model.embed_tokens_per_layer.weight.shape)
            out = Path(d) / f"{table}.pte"
            info = export_pte(m, gemma_tokenizer(), out, max_context=64)
            ids = torch.randint(3, m.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                want = m(ids[None]).logits[0]
            got = PteModel(out).logits(ids)
            sizes[table] = info["file_bytes"]
            predicted = sizes["int8"] - mobile_bytes(shape, "int8") + mobile_bytes(shape, table)
            per_pos = (got - want).abs().amax(-1) / want.abs().amax()
            p, q = (torch.log_softmax(x.double(), -1) for x in (want, got))
            kl = float((p.exp() * (p - q)).sum(-1).mean())
            print(f"per-layer table {shape} {table}: {info['file_bytes']:,} bytes (predicted from the int8 program: {predicted:,}, "
                  f"off by {info['file_bytes'] - predicted:+,}); program vs student over 40 positions: {float((per_pos <= 2e-6).float().mean()):.0%} "
                  f"within 2e-6 of the largest logit, mean KL {kl:.1e}")

        from test_gemma4 import E2B

        from qatkit.planner import plan_budget

        cfg = Path(d) / "e2b.json"
        cfg.write_text(json.dumps({"model_type": "gemma4_text", **E2B}))
        r = plan_budget(str(cfg), 10**12, "mobile", sizes_only=True)
        lo = sum(min(e.options.values()) for e in r["entries"])
        ple = next(e for e in r["entries"] if e.name == "model.embed_tokens_per_layer")
        print(f"Gemma 4 E2B text decoder, mobile: smallest program weights {lo / 1e9:.3f} GB "
              f"({8 * lo / r['params']:.3f} bits per parameter); its per-layer table {ple.shape} at int2: {ple.options['int2'] / 1e9:.3f} GB "
              f"(int4: {ple.options['int4'] / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
