"""What the re-quantization cut of learned Q4_0 scales costs, and what it saves, on the default model.

Two learned-scale QAT runs of the same recipe, side by side: one as qatkit trains (every block
keeps a code 0: the quantizer cuts a scale that would leave none, and the loop writes the cut
into the parameter), one with the cut switched off in training and export (the behaviour before
it). For each: blocks without a code 0 in the QAT GGUF, Q4_0 blocks llama.cpp's quantizer changes
when it re-quantizes the HF export of the file's values, the training's held-out KL, and KLD to
the float teacher in llama.cpp on the held-out suite.

    python benchmarks/scale_cut.py [--steps 100] [--chunks 1] [--out runs/scale_cut]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

from qatkit.eval.suite import held_out_texts, load_suite
from qatkit.export.gguf import load_gguf_weights, read_gguf_tensors
from qatkit.export.hf import write_hf
from qatkit.export.provenance import describe
from qatkit.formats import q4_0
from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig
from qatkit.runtime.llamacpp import score_files
from qatkit.targets.gguf import float_reference, write_trained
from qatkit.targets.hf import requantize_check
from qatkit.train import loop
from qatkit.train.loop import TrainConfig
from qatkit.train.run import RunConfig, qat_run


@contextmanager
def cut(on: bool):
    if on:
        yield
        return
    with mock.patch.object(q4_0, "_cut_to_code_zero", lambda b, codes, d16: (codes, d16)), mock.patch.object(loop, "_follow_scale_cuts", lambda s: 0):
        yield


def lacking(path: Path) -> tuple[int, int]:
    """(Q4_0 blocks of the file without a code 0, all Q4_0 blocks)."""
    n = total = 0
    for _, (t, data, _) in read_gguf_tensors(path).items():
        if t == q4_0.GGML_TYPE:
            codes, _ = q4_0.unpack(np.asarray(data).reshape(-1, q4_0.BLOCK_BYTES))
            has = (codes.reshape(-1, q4_0.BLOCK) == 0).any(-1)
            n, total = n + int((~has).sum()), total + has.size
    return n, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=1, help="512-token chunks per held-out domain")
    ap.add_argument("--out", type=Path, default=Path("runs/scale_cut"))
    args = ap.parse_args()
    source = resolve("gemma3-270m")
    teacher, tok = load(source)
    ref = float_reference(source, teacher, tok)
    rows, files = {}, {}
    for name, on in (("cut", True), ("no cut", False)):
        cfg = RunConfig(model="gemma3-270m", data_free=0.0, qat=QATConfig(fmt="q4_0", learn_scales=True), train=TrainConfig(steps=args.steps))
        run_dir = args.out / name.replace(" ", "-")
        with cut(on):
            trained = qat_run(cfg, run_dir, resume=True, loaded=(source, teacher, tok))
            path = run_dir / "qat-q4_0.gguf"
            info = write_trained(trained, path, progress=False)
            student = trained["student"]
            load_gguf_weights(student, source.arch, path)
            with tempfile.TemporaryDirectory() as d:
                write_hf(student, tok, Path(d) / "hf", describe(info["plan"], "q4_0", info["training"]))
                check = requantize_check(Path(d) / "hf", path, "q4_0")
        moved = sum(v[0] for v in check["differ"].values() if isinstance(v[0], int))
        kls = [r["held_out_kl"] for r in trained["metrics"] if "held_out_kl" in r]
        rows[name] = {"lacking": lacking(path), "requant_blocks_moved": moved, "tensors_identical": f"{check['identical']}/{check['tensors']}",
                      "held_out_kl": kls[-1], "cuts_in_training": sum(r.get("scale_cuts", 0) for r in trained["metrics"])}
        files[name] = path
        print(name, json.dumps(rows[name]), flush=True)
    texts = held_out_texts(load_suite(), cfg.train_sources)
    klds = {n: [] for n in files}
    for domain, text in texts.items():
        res = score_files([str(files[n]) for n in files], text, ref_path=str(ref), max_chunks=args.chunks)
        for n, r in zip(files, res):
            klds[n].append(r["kld"])
    print(f"\n{'':8} {'blocks without code 0':>22} {'moved by llama.cpp':>19} {'tensors same':>13} {'held-out KL':>12} {'KLD (llama.cpp)':>16}")
    for n, r in rows.items():
        print(f"{n:8} {r['lacking'][0]:>10,} of {r['lacking'][1]:>9,} {r['requant_blocks_moved']:>19,} {r['tensors_identical']:>13} "
              f"{r['held_out_kl']:>12.4f} {np.mean(klds[n]):>16.5f}")
    print(f"KLD: mean over {len(texts)} held-out domains ({', '.join(texts)}), {args.chunks} chunk(s) of 512 each; training text: {', '.join(cfg.train_sources)}")


if __name__ == "__main__":
    main()
