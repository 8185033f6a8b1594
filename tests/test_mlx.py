"""The MLX export on tiny models: qatkit's Q4_0 GGUF -> write_mlx -> mlx_lm.load. Every quantized
MLX module dequantizes to the file's values bit for bit (the trained numbers), mlx-lm's logits
are the torch model's (which holds the file's values) to float32 rounding with the same argmax,
and models mlx-lm cannot run are refused before anything is written."""

import copy
import json
import sys

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed: pip install 'qatkit[mlx]'")

import mlx.core as mx  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from mlx_lm import load as mlx_load  # noqa: E402

from qatkit import QatkitError  # noqa: E402
from qatkit.export import mlx as mlx_export  # noqa: E402
from qatkit.export.gguf import load_gguf_weights  # noqa: E402
from qatkit.export.mlx import write_mlx  # noqa: E402
from qatkit.models.arch import arch_for_config  # noqa: E402
from qatkit.models.load import load, resolve  # noqa: E402
from tiny_models import TEXT, export_gguf, gemma4_dir, gemma_tokenizer, logits_np, tiny_gemma4, tiny_model, tiny_tokenizer  # noqa: E402

# name: (family, model settings, --pure, whether the file has Q8_0 tensors, tensors kept float32)
CASES = {
    # untied head (Q8_0: 64 is no multiple of Q6_K's 256), q/k rows permuted in the GGUF
    "llama": ("llama", {}, False, True, []),
    # the head in Q6_K (256 wide): kept float32, listed
    "llama-q6k": ("llama", dict(hidden=256), False, False, ["lm_head.weight (q6_k"]),
    # tied Q8_0 embedding = the head; rope_theta 1e4 where mlx-lm's qwen2 defaults to 1e6
    "qwen2": ("qwen2", {}, False, True, []),
    # --pure: the tied embedding in Q4_0 too
    "qwen3-pure": ("qwen3", {}, True, False, []),
    "gemma3": ("gemma3", dict(layers=6), False, True, []),
    # sqrt(96) is no bfloat16 number: mlx-lm's rounded embedding scale, made up in the post-norms
    "gemma3-h96": ("gemma3", dict(layers=6, hidden=96), False, True, []),
    # E-style: per-layer embeddings, K/V sharing, double-wide MLP, full layers of their own head size
    "gemma4": ("gemma4", {}, False, True, ["model.per_layer_model_projection.weight (f32"]),
}
# max |mlx - torch| over the logits' std. Measured (mlx 0.32.4, x86 CPU): 1.9e-6 to 5.3e-6, Gemma 4
# 1.4e-4 (2.3e-5 / 0.16), where torch float32 itself is 2.8e-5 from float64 (MLX 2.4e-5): rounding
REL_BOUND = {"gemma4": 3e-4}
DEFAULT_REL_BOUND = 2e-5


def _model(family, kw):
    if family == "gemma4":
        return tiny_gemma4(**kw), gemma_tokenizer()
    return tiny_model(family, **kw), tiny_tokenizer()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(case, result of write_mlx, torch model holding the GGUF's values, mlx-lm model, token ids)."""
    family, kw, pure, _, _ = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model, tok = _model(family, kw)
    gguf = d / "q4_0.gguf"
    export_gguf(model, tok, gguf, "q4_0", pure=pure)
    arch = arch_for_config(model.config)
    student = copy.deepcopy(model)
    load_gguf_weights(student, arch, gguf)
    result = write_mlx(student, tok, gguf, arch, d / "mlx", provenance={"case": request.param}, progress=False)
    mlx_model, _ = mlx_load(str(d / "mlx"))
    ids = tok(TEXT)["input_ids"][:60]
    types = [t.tensor_type.name for t in GGUFReader(gguf).tensors if len(t.shape) == 2]
    return request.param, result, student, mlx_model, ids, {4: types.count("Q4_0"), 8: types.count("Q8_0")}


def test_quantized_weights_are_the_files_values(exported):
    case, result, student, mlx_model, _, in_file = exported
    _, _, _, has_q8, floats = CASES[case]
    n4, n8 = in_file[4], in_file[8]
    assert n4 > 10 and (n8 > 0) == has_q8
    assert result["quantized"] == {"4bit": n4, "8bit": n8}  # every Q4_0 / Q8_0 matrix of the file
    for prefix in floats:
        assert any(f.startswith(prefix) for f in result["float"]), result["float"]
    torch_weights = student.state_dict()
    seen = {4: 0, 8: 0}
    for name, m in mlx_model.named_modules():
        if not hasattr(m, "scales"):
            continue
        assert m.group_size == 32 and m.mode == "affine" and m.scales.dtype == m.biases.dtype == mx.float32
        w = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=32, bits=m.bits))
        assert np.array_equal(w, torch_weights[f"{name}.weight"].numpy()), name
        seen[m.bits] += 1
    assert seen == {4: n4, 8: n8}  # every module the exporter quantized, and only those, is quantized in MLX
    # the rest is float32, never float16 / bfloat16 (MLX would compute in it)
    from mlx.utils import tree_flatten

    assert {v.dtype for _, v in tree_flatten(mlx_model.parameters())} <= {mx.float32, mx.uint32}


def test_logits_match_the_torch_model(exported):
    case, result, student, mlx_model, ids, _ = exported
    want = logits_np(student, ids).astype(np.float64)
    got = np.array(mlx_model(mx.array([ids])).astype(mx.float32))[0].astype(np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    diff, std = np.abs(got - want).max(), want.std()
    print(f"REPORT {case}: max|mlx - torch| {diff:.3g}, std {std:.3g}, ratio {diff / std:.3g}")
    assert std > 0.05  # logits that are not flat, so agreeing means something
    assert diff <= REL_BOUND.get(CASES[case][0], DEFAULT_REL_BOUND) * std
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_directory(exported):
    case, result, *_ = exported
    out = result["path"]
    config = json.load(open(f"{out}/config.json"))
    assert config["qatkit"] == {"case": case}
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert result["bytes"] == mlx_export.directory_bytes(out) > 0
    with open(f"{out}/model.safetensors", "rb") as f:  # written by safetensors itself, tagged for MLX
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "mlx"}
    assert not any(k.startswith("lm_head") for k in header) or CASES[case][0] == "llama"  # a tied head is not written


def _setup(family, kw, tmp_path, pure=False):
    model, tok = _model(family, kw)
    gguf = tmp_path / "q4_0.gguf"
    export_gguf(model, tok, gguf, "q4_0", pure=pure)
    arch = arch_for_config(model.config)
    load_gguf_weights(model, arch, gguf)
    return model, tok, gguf, arch


def test_sharded_export_loads(tmp_path, monkeypatch):
    """Shards of at most SHARD_BYTES, with mlx-lm's index, load as one model."""
    model, tok, gguf, arch = _setup("qwen3", {}, tmp_path)
    monkeypatch.setattr(mlx_export, "SHARD_BYTES", 20_000)
    write_mlx(model, tok, gguf, arch, tmp_path / "mlx", progress=False)
    shards = sorted(p.name for p in (tmp_path / "mlx").glob("model*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(tmp_path / "mlx" / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    ids = tiny_tokenizer()(TEXT)["input_ids"][:20]
    got, want = np.array(mlx_load(str(tmp_path / "mlx"))[0](mx.array([ids])))[0], logits_np(model, ids)
    assert np.abs(got - want).max() <= DEFAULT_REL_BOUND * want.std()


def test_export_does_not_need_mlx(tmp_path, monkeypatch):
    """Without mlx importable the export is the same (only loading needs it)."""
    model, tok, gguf, arch = _setup("llama", {}, tmp_path)
    a = write_mlx(model, tok, gguf, arch, tmp_path / "a", progress=False)
    for name in [n for n in sys.modules if n == "mlx" or n.startswith(("mlx.", "mlx_lm"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    b = write_mlx(model, tok, gguf, arch, tmp_path / "b", progress=False)
    assert "mlx.core" not in sys.modules
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["quantized"] == b["quantized"]


def _refused(tmp_path, fn, match):
    out = tmp_path / "out"
    with pytest.raises(QatkitError, match=match):
        fn(out)
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "nothing may be left on disk"


def test_moe_is_refused(tmp_path, private_cache):
    src = gemma4_dir(tmp_path / "moe", shape="moe")
    source = resolve(str(src))
    model, tok = load(source)
    gguf = tmp_path / "moe.gguf"
    export_gguf(model, tok, gguf, "q4_0")
    load_gguf_weights(model, source.arch, gguf)
    _refused(tmp_path, lambda out: write_mlx(model, tok, gguf, source.arch, out, progress=False), "MoE")


def test_short_gemma3_is_refused(tmp_path):
    """mlx-lm's gemma3_text fails on fewer layers than its sliding-window pattern (6)."""
    model, tok, gguf, arch = _setup("gemma3", dict(layers=2), tmp_path)
    _refused(tmp_path, lambda out: write_mlx(model, tok, gguf, arch, out, progress=False), "fewer than its sliding-window pattern")


def test_model_without_the_files_values_is_refused(tmp_path):
    model, tok, gguf, arch = _setup("llama", {}, tmp_path)
    fresh = tiny_model("llama", seed=1)  # the same shapes, other values: load_gguf_weights was not called on it
    _refused(tmp_path, lambda out: write_mlx(fresh, tok, gguf, arch, out, progress=False), "not the GGUF file's values")


def test_cli_exports_a_trained_run_and_refuses_moe_in_one_line(tmp_path, private_cache, capsys):
    """`qatkit export RUN_DIR --format mlx`: the run's trained student with the QAT file's codes
    and scales (logits of mlx-lm = those of a twin carrying the QAT GGUF's values, to float
    rounding); an MoE model is one line, exit 2, no directory."""
    from qatkit.cli import main
    from tiny_models import hf_dir

    src = hf_dir(tmp_path / "src", "llama")
    (tmp_path / "text.txt").write_text(TEXT * 4)
    run = tmp_path / "run"
    assert main(["train", str(src), "--data", str(tmp_path / "text.txt"), "--steps", "8", "--seq-len", "32", "--batch-size", "2",
                 "--held-out", "2", "--learn-scales", "--lr", "3e-3", "--export", "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "mlx", "--out", str(tmp_path / "mlx")]) == 0
    assert "the trained student" in capsys.readouterr().out
    prov = json.loads((tmp_path / "mlx" / "config.json").read_text())["qatkit"]
    assert prov["training"]["steps"] == 8 and prov["format"] == "q4_0"
    twin, _ = load(resolve(str(src)))
    load_gguf_weights(twin, arch_for_config(twin.config), run / "qat-q4_0.gguf")
    model, _ = mlx_load(str(tmp_path / "mlx"))
    ids = [0] + [(7 * i) % 300 + 3 for i in range(40)]
    ours, ref = np.array(model(mx.array([ids]))[0].astype(mx.float32)), logits_np(twin, ids)
    assert np.abs(ours - ref).max() <= DEFAULT_REL_BOUND * ref.std() and (ours.argmax(-1) == ref.argmax(-1)).all()
    moe = gemma4_dir(tmp_path / "moe", shape="moe")
    assert main(["export", str(moe), "--format", "mlx", "--out", str(tmp_path / "mlx-moe")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MoE" in err[0] and not (tmp_path / "mlx-moe").exists()
