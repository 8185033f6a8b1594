"""A finished QAT run of the default model written as an HF checkpoint and as an MLX model, each
checked against the run's own QAT GGUF, side by side in one run:

1. `--format hf`, then llama.cpp's own path: its converter script (convert_hf_to_gguf.py from
   the llama-cpp-python 0.3.36 source archive, --outtype f32) and its quantizer (Q4_0 mix) ->
   tensor for tensor against RUN_DIR/qat-q4_0.gguf (and the same through qatkit's F32 exporter);
2. `--format mlx`: perplexity and KL to the float teacher of the MLX model in mlx-lm (CPU) and of
   the QAT GGUF in llama.cpp, on the same chunks of the held-out suite (llama.cpp's tokens);
3. sizes on disk and load times (transformers, mlx-lm, llama.cpp).

    python benchmarks/hf_mlx.py RUN_DIR [--chunks 1] [--out DIR]

RUN_DIR: `qatkit train gemma3-270m --export --out RUN_DIR` (any Q4_0 run; --learn-scales
exercises the scale cut). The held-out domains are unlike the default training text except
`docs` when the run trained on CPython's reference prose (the default text), labelled in-domain.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qatkit import metrics
from qatkit.eval.suite import in_domain, load_suite
from qatkit.models.load import resolve
from qatkit.runtime.llamacpp import _logits_fn, _text_tokens, adds_bos, open_model
from qatkit.targets import hf
from qatkit.targets.gguf import float_reference
from qatkit.train.run import load_run_config

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp-convert"


def llama_convert(src: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")}
    r = subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32", "--outfile", str(out)],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama.cpp's converter failed:\n{r.stderr[-2000:]}")
    return out


def mlx_logits_fn(model):
    import mlx.core as mx

    def fn(chunk, first=0):
        out = model(mx.array([list(chunk)]))[0, first:]
        return np.array(out.astype(mx.float32))

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--chunks", type=int, default=1, help="512-token chunks per held-out domain")
    ap.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temporary directory)")
    args = ap.parse_args()
    cfg = load_run_config(args.run_dir)
    qat = args.run_dir / f"qat-{cfg.qat.fmt}.gguf"
    if not qat.exists():
        raise SystemExit(f"{qat} is missing: train with --export")
    work = args.out or Path(tempfile.mkdtemp(prefix="hf_mlx-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = {}

    t0 = time.perf_counter()
    info = hf.export(str(args.run_dir), work / "hf", "hf", verify=True)
    rows["hf export s"] = time.perf_counter() - t0
    check = info["verify"]
    print(f"HF export: {info['bytes'] / 1e6:.1f} MB in {rows['hf export s']:.1f} s; qatkit's F32 exporter + llama.cpp's quantizer: "
          f"{check['identical']} of {check['tensors']} tensors byte-identical to {qat.name}")
    t0 = time.perf_counter()
    conv = llama_convert(work / "hf", work / "converter-f32.gguf")
    check2 = hf.requantize_check(work / "hf", qat, cfg.qat.fmt, cfg.qat.pure, f32_gguf=conv)
    print(f"llama.cpp's converter script + llama.cpp's quantizer: {check2['identical']} of {check2['tensors']} tensors byte-identical "
          f"({time.perf_counter() - t0:.0f} s){'; differ: ' + json.dumps(check2['differ']) if check2['differ'] else ''}")
    conv.unlink()

    t0 = time.perf_counter()
    minfo = hf.export(str(args.run_dir), work / "mlx", "mlx")
    print(f"MLX export: {minfo['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s ({minfo.get('quantized')}; float: {minfo.get('float')})")

    # load times, each in this process, smallest first
    from mlx_lm import load as mlx_load
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    mlx_model, _ = mlx_load(str(work / "mlx"))
    t_mlx = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = open_model(str(qat), n_ctx=512, logits_all=False)
    t_llama = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(work / "hf")
    t_hf = time.perf_counter() - t0
    del hf_model
    gc.collect()

    teacher = open_model(str(float_reference(resolve(cfg.model))), n_ctx=512, logits_all=False)
    fns = [_logits_fn(llm), mlx_logits_fn(mlx_model), _logits_fn(teacher)]
    names = ["llama.cpp, QAT GGUF", "mlx-lm, MLX export", "llama.cpp, F32 teacher"]
    bos = llm.token_bos() if adds_bos(llm) else None
    table = {}
    for domain, text in load_suite().items():
        chunk_list = metrics.chunks(_text_tokens(llm, text), 512, bos, args.chunks, label=domain)
        scores = metrics.score_chunks(fns, chunk_list, ref_index=2)
        table[domain] = [s.result() for s in scores]
        tag = " (in-domain: the training text's source)" if in_domain(domain, cfg.train_sources) else ""
        print(f"{domain}{tag}: " + "; ".join(f"{n} PPL {r['ppl']:.4f} KLD {r['kld']:.5f}" for n, r in zip(names, table[domain])))
    held = [d for d in table if not in_domain(d, cfg.train_sources)]
    for i, n in enumerate(names[:2]):
        print(f"mean over the {len(held)} held-out domains, {n}: PPL {np.mean([table[d][i]['ppl'] for d in held]):.4f}, "
              f"KLD {np.mean([table[d][i]['kld'] for d in held]):.5f}")
    dir_mb = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6  # noqa: E731
    print(f"sizes: GGUF {qat.stat().st_size / 1e6:.1f} MB, MLX {dir_mb(work / 'mlx'):.1f} MB, HF (float32) {dir_mb(work / 'hf'):.1f} MB")
    print(f"load: llama.cpp {t_llama:.2f} s, mlx-lm {t_mlx:.2f} s, transformers {t_hf:.2f} s")


if __name__ == "__main__":
    main()
