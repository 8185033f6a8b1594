"""Where an ExecuTorch program spends its decode time: ETDump of the real runtime, per operator.

Builds a random model of a real family's width (Gemma 3 270M by default: hidden 640, vocabulary
262,144) with a few layers, prepares it for the mobile format, exports it with qatkit's exporter
(timed), then runs a prefill and single-token decode steps through ExecuTorch with ETDump on and
prints the time per kind of event (XNNPACK delegate calls, each portable operator), the
partition count, and the export's seconds and peak memory.

    python benchmarks/pte_profile.py [--layers 2] [--embedding int4] [--decode 32] [--pte existing.pte]
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
import time
from pathlib import Path

import torch


def build(layers: int, embedding: str, out: Path, max_context: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatkit.export.executorch import export_pte
    from qatkit.models.arch import arch_for_config
    from qatkit.prepare import QATConfig, prepare
    from tiny_models import tiny_tokenizer

    cfg = AutoConfig.for_model("gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512, max_position_embeddings=2048,
                               query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prepare(model, arch_for_config(model.config), QATConfig(fmt="mobile", embedding=embedding))
    t0 = time.perf_counter()
    info = export_pte(model, tiny_tokenizer(), out, max_context=max_context)
    info["wall_s"] = time.perf_counter() - t0
    return info


def profile(pte: Path, prompt: int, decode: int) -> list[tuple[str, float, int]]:
    import executorch.kernels.quantized  # noqa: F401
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    m = _load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    ids = torch.randint(10, 1000, (1, prompt))
    m.run_method("forward", [ids, torch.tensor([0])])
    t0 = time.perf_counter()
    for i in range(decode):
        m.run_method("forward", [torch.tensor([[7 + i]]), torch.tensor([prompt + i])])
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "etdump.etdp"
        m.write_etdump_result_to_file(str(path))
        insp = Inspector(etdump_path=str(path))
    per = collections.defaultdict(lambda: [0.0, 0])
    for block in insp.event_blocks:
        for ev in block.events:
            if ev.perf_data is None or ev.name in ("Method::execute", "Program::load_method", "Method::init"):
                continue
            name = ev.name if not ev.delegate_backend_name else f"delegate {ev.delegate_backend_name}"
            per[name][0] += sum(ev.perf_data.raw)
            per[name][1] += len(ev.perf_data.raw)
    print(f"decode: {decode} single-token steps in {wall:.3f} s = {decode / wall:.1f} tok/s (after a prefill of {prompt}); events include the prefill")
    return sorted(((k, v[0], v[1]) for k, v in per.items()), key=lambda r: -r[1])


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embedding", default="int4")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--pte", type=Path, help="profile this program instead of building one")
    ap.add_argument("--keep", type=Path, help="write the built program here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pte = args.pte
        if pte is None:
            pte = args.keep or Path(d) / "profile.pte"
            info = build(args.layers, args.embedding, pte, args.max_context)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"export: {info['wall_s']:.1f} s (torch.export {info['export_s']:.1f} s, lowering {info['lower_s']:.1f} s), "
                  f"peak RSS {rss:.2f} GB, {info['xnnpack_partitions']} XNNPACK partitions, {info['file_bytes'] / 1e6:.1f} MB")
            print("outside XNNPACK:", ", ".join(op for op in info["outside_xnnpack"] if not op.startswith("<")))
        rows = profile(pte, args.prompt, args.decode)
        total = sum(r[1] for r in rows)
        print(f"{torch.get_num_threads()} threads; time by event over prefill + decode (ETDump)")
        for name, t, n in rows[:25]:
            print(f"  {name:<48} {t:10.1f} {'':2} {100 * t / total:5.1f}%  ({n} calls)")


if __name__ == "__main__":
    main()
