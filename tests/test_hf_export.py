"""`qatkit export RUN_DIR|MODEL --format hf`: a float32 transformers checkpoint holding the GGUF
file's values, which llama.cpp's own path (a float GGUF of it, then llama-quantize) turns back
into qatkit's Q4_0 bytes, tensor for tensor; learned scales cut so that every block keeps the
code llama.cpp recovers its scale from; provenance in every file."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from test_gemma4 import llama_convert
from transformers import AutoModelForCausalLM

from qatkit.cli import main
from qatkit.export.gguf import load_gguf_weights
from qatkit.formats import q4_0
from qatkit.models.arch import arch_for_config
from qatkit.targets.hf import requantize_check
from tiny_models import TEXT, gemma4_dir, hf_dir, logits_np

IDS = [0] + [(7 * i) % 300 + 3 for i in range(40)]


@pytest.fixture(autouse=True)
def _cache(private_cache):
    return private_cache


def lacking_code_zero(w: torch.Tensor, d: torch.Tensor) -> int:
    """Blocks in which no weight takes code 0 under the fp16 scale d, computed directly (no cut)."""
    b = w.float().reshape(*w.shape[:-1], -1, 32)
    d16 = d.to(torch.float16).float().unsqueeze(-1)
    q = torch.trunc(b / d16 + 8.5).clamp(0, 15)
    return int((~(q == 0).any(-1)).sum())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gemma4", "gemma4-moe"])
def test_ptq_export_loads_with_the_files_values_and_requantizes_to_its_bytes(family, tmp_path, capsys):
    if family.startswith("gemma4"):
        src = gemma4_dir(tmp_path / "src", **({"shape": "moe"} if family.endswith("moe") else {}))
    else:  # (qwen2's tokenizer metadata counts one id past the tiny tokenizer's 320: a larger table)
        src = hf_dir(tmp_path / "src", family, **({"vocab_size": 384} if family == "qwen2" else {}))
    assert main(["export", str(src), "--format", "q4_0", "--out", str(tmp_path / "q.gguf")]) == 0
    out = tmp_path / "hf"
    assert main(["export", str(src), "--format", "hf", "--out", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    n = len(GGUFReader(tmp_path / "q.gguf").tensors)
    assert f"{n} of {n} tensors byte-identical" in text
    # transformers loads it, float32, with the values of the Q4_0 file: the same logits as a twin carrying them
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and json.loads((out / "config.json").read_text())["qatkit"]["format"] == "q4_0"
    twin = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    load_gguf_weights(twin, arch_for_config(twin.config), tmp_path / "q.gguf")
    assert np.array_equal(logits_np(model.eval(), IDS), logits_np(twin, IDS))
    # and not the float model's (the export really carries the quantized values)
    assert not np.array_equal(logits_np(model, IDS), logits_np(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), IDS))


def test_bf16_would_not_round_trip(tmp_path):
    """Why float32: the same values stored in bf16 come back from llama.cpp's quantizer as other
    bytes (a block's -8d needs d's 11 significant bits; bf16 keeps 8)."""
    src = hf_dir(tmp_path / "src", "llama")
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(src), "--format", "q4_0", "--out", str(tmp_path / "q.gguf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    check = requantize_check(tmp_path / "bf16", tmp_path / "q.gguf", "q4_0")
    assert check["identical"] < check["tensors"] and sum(v[0] for v in check["differ"].values() if isinstance(v[0], int)) > 100


def train(tmp_path, src, *extra):
    (tmp_path / "text.txt").write_text(TEXT * 4)
    run = tmp_path / "run"
    args = ["train", str(src), "--data", str(tmp_path / "text.txt"), "--steps", "12", "--seq-len", "32", "--batch-size", "2", "--held-out", "2",
            "--eval-every", "6", "--out", str(run), *extra]
    assert main(args) == 0
    return run


def test_qat_run_exports_hf_that_requantizes_to_the_qat_file(tmp_path, capsys):
    """A learned-scale run (llama: its q/k rows permuted for llama.cpp, scales following their
    rows) at a learning rate that moves weights under their scales: every block still keeps its
    code 0 (the loop follows the cut), the QAT GGUF is rebuilt by llama.cpp byte for byte from the
    HF export, and the export computes what the student computed."""
    src = hf_dir(tmp_path / "src", "llama")
    run = train(tmp_path, src, "--learn-scales", "--lr", "3e-3", "--export")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)["params"]
    scales = {k: v for k, v in ckpt.items() if k.endswith(".scale")}
    assert scales and all(lacking_code_zero(ckpt[k[: -len("scale")] + "weight"], d) == 0 for k, d in scales.items())
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    n = len(GGUFReader(run / "qat-q4_0.gguf").tensors)
    assert f"{n} of {n} tensors byte-identical" in text and "the trained student" in text
    # the HF export's values are the QAT file's, so transformers computes what llama.cpp's twin of the file does
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    twin = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    load_gguf_weights(twin, arch_for_config(twin.config), run / "qat-q4_0.gguf")
    assert np.array_equal(logits_np(model, IDS), logits_np(twin, IDS))
    # provenance: the run's summary in the HF config and in the QAT GGUF
    prov = json.loads((out / "config.json").read_text())["qatkit"]
    assert prov["training"]["steps"] == 12 and prov["training"]["learn_scales"] is True and prov["training"]["scale_cuts"] == 0
    assert len(prov["training"]["held_out_kl"]) == 2
    fields = {k: f.contents() for k, f in GGUFReader(run / "qat-q4_0.gguf").fields.items() if k.startswith(("qatkit.", "general.quantized_by"))}
    assert fields["general.quantized_by"] == "qatkit" and fields["qatkit.plan"] == prov["plan_digest"]
    assert json.loads(fields["qatkit.training"])["steps"] == 12


def test_scales_grown_past_their_blocks_are_cut_and_round_trip(tmp_path):
    """Learned scales moved by -10%..+20% (a run without the cut ended with 16-22% of its blocks so
    at lr 1e-3) leave the grown blocks without a code 0; quantize cuts them, and llama.cpp's quantizer on the values
    then gives the very bytes qatkit wrote."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    d = q4_0.absmax_scale(w) * torch.empty(64, 8).uniform_(0.9, 1.2)
    assert lacking_code_zero(w, d) > 100
    codes, d16 = q4_0.quantize(w, d)
    values = q4_0.dequantize(codes, d16)
    again_codes, again_d = q4_0.quantize(values)  # ggml's own quantizer (bit-exact with llama.cpp's) on the values
    assert torch.equal(again_codes, codes) and torch.equal(again_d.view(torch.int16), d16.view(torch.int16))
    kept = d16 == d.to(torch.float16)
    assert 0 < int(kept.sum()) < kept.numel()  # only the blocks that lacked code 0 changed
    assert (d16.float().abs() <= d.to(torch.float16).float().abs()).all()  # a cut, never a growth


def test_gemma4_export_through_llama_cpps_own_converter(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (F32) on the HF export of a Gemma 4 E-style model, then
    llama-quantize: the QAT-shaped Q4_0 file again, tensor for tensor (the tiny tokenizers of
    the other families are refused by that script's pre-tokenizer table; qatkit's F32 exporter
    writes the converter's tensors, tested in test_gemma4.py)."""
    src = gemma4_dir(tmp_path / "src")
    assert main(["export", str(src), "--format", "q4_0", "--out", str(tmp_path / "q.gguf")]) == 0
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    f32 = llama_convert(tmp_path / "hf", tmp_path / "conv-f32.gguf")
    check = requantize_check(tmp_path / "hf", tmp_path / "q.gguf", "q4_0", f32_gguf=f32)
    assert check["differ"] == {} and check["tensors"] == len(GGUFReader(tmp_path / "q.gguf").tensors)


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    src = hf_dir(tmp_path / "src", "llama")
    run = train(tmp_path, src)
    (run / "checkpoint.pt").unlink()
    cases = {
        "no checkpoint": [str(run)],
        "not a model": [str(tmp_path / "text.txt")],
    }
    for why, spec in cases.items():
        out = tmp_path / f"out-{why.replace(' ', '-')}"
        assert main(["export", *spec, "--format", "hf", "--out", str(out)]) == 2, why
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qatkit: error:"), (why, err)
        assert not out.exists()
    # a directory of other files is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(src), "--format", "hf", "--out", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "keep me"


def test_unfinished_run_is_refused(tmp_path, capsys, monkeypatch):
    from tiny_models import ctrl_c_at_step

    src = hf_dir(tmp_path / "src", "llama")
    ctrl_c_at_step(monkeypatch, 5)
    (tmp_path / "text.txt").write_text(TEXT * 4)
    run = tmp_path / "run"
    main(["train", str(src), "--data", str(tmp_path / "text.txt"), "--steps", "12", "--seq-len", "32", "--batch-size", "2", "--held-out", "2", "--out", str(run)])
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "stopped at step 4 of 12" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_every_gguf_says_who_made_it(tmp_path):
    src = hf_dir(tmp_path / "src", "qwen3")
    assert main(["export", str(src), "--format", "q8_0", "--out", str(tmp_path / "q.gguf")]) == 0
    f = GGUFReader(tmp_path / "q.gguf").fields
    assert f["general.quantized_by"].contents() == "qatkit" and f["qatkit.version"].contents()
    assert f["qatkit.plan"].contents().startswith("sha256:") and "qatkit.training" not in f


def test_q6_k_heads_are_counted_where_llama_cpp_moves_them(tmp_path, caplog):
    """A width that is a multiple of 256 gets llama.cpp's Q6_K output in the Q4_0 mix. Q6_K's
    scale search is not idempotent: the export says in how many super-blocks, and llama.cpp's
    quantizer on the export rewrites exactly those (qatkit's encoder vs llama.cpp's own), here
    with the same values (another factoring of d x scale), so llama.cpp computes the same logits."""
    from qatkit.targets.hf import not_fixed_points

    src = hf_dir(tmp_path / "src", "llama", hidden=256)
    assert main(["export", str(src), "--format", "q4_0", "--out", str(tmp_path / "q.gguf")]) == 0
    moved = not_fixed_points(tmp_path / "q.gguf")
    assert list(moved) == ["output.weight"] and moved["output.weight"][0] > 0 and moved["output.weight"][1] == 0
    with caplog.at_level("WARNING"):
        assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "output.weight in" in caplog.text
    check = requantize_check(tmp_path / "hf", tmp_path / "q.gguf", "q4_0")
    assert check["differ"] == {n: (k, total) for n, (k, _, total) in moved.items()}  # every other tensor byte for byte
    assert check["values_differ"] == {"output.weight": 0}  # llama.cpp's rewritten blocks hold the same values
