"""Gemma 4 on tiny random models of three shapes: E-style (per-layer embeddings, K/V sharing,
double-wide MLP), 26B-style (MoE beside the dense MLP, K = V, per-layer KV heads) and the 12B
"unified" kind (a multimodal checkpoint without towers, stripped to its decoder). qatkit's GGUF is the file llama.cpp's own converter writes from the same directory, its
Q4_0 is byte for byte llama-quantize's, QAT exports a file llama.cpp computes exactly as the
student did, and layouts llama.cpp cannot run are refused before a file exists.

The converter is llama.cpp's `convert_hf_to_gguf.py` from the llama-cpp-python 0.3.36 source
archive (unpacked by scripts/setup.sh), run as its own program with its own gguf-py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from qatkit.cli import main
from qatkit.models.gemma4 import REFERENCE_SHAPES
from qatkit.runtime.llamacpp import chunk_logits, llama_quantize, open_model
from tiny_models import ctrl_c_at_step, gemma4_dir

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp-convert"


@pytest.fixture(autouse=True)
def _cache(private_cache):
    return private_cache


def llama_convert(src: Path, out: Path) -> Path:
    script = CONVERTER / "convert_hf_to_gguf.py"
    assert script.exists(), f"{script} is missing: run scripts/setup.sh (it unpacks llama.cpp's converter)"
    env = {**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")}
    r = subprocess.run([sys.executable, str(script), str(src), "--outtype", "f32", "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def tensors(path) -> dict:
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data).view(np.uint8).tobytes()) for t in GGUFReader(path).tensors}


def fields(path, prefixes=("gemma4.", "tokenizer.ggml.")) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith(prefixes)}


@pytest.fixture(scope="module", params=["e", "moe", "unified"])
def model_dir(request, tmp_path_factory):
    """(shape, directory, llama.cpp's converter's F32 file of it), made once per shape."""
    d = tmp_path_factory.mktemp("g4")
    src = gemma4_dir(d / request.param, shape=request.param)
    return request.param, src, llama_convert(src, d / "converter-f32.gguf")


def test_f32_export_is_the_converters_file(model_dir, tmp_path, capsys):
    shape, src, ref = model_dir
    ours = tmp_path / "qatkit-f32.gguf"
    assert main(["export", str(src), "--format", "f32", "--out", str(ours)]) == 0
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b) and len(a) == {"e": 102, "moe": 133, "unified": 85}[shape]
    assert [n for n in a if a[n] != b[n]] == []  # names, types, shapes and bytes
    fa, fb = fields(ours), fields(ref)
    assert fa.pop("tokenizer.ggml.add_eos_token") is False and fa == fb  # every architecture and tokenizer key, valued alike
    if shape == "e":
        assert {"per_layer_token_embd.weight", "per_layer_model_proj.weight", "rope_freqs.weight", "blk.5.layer_output_scale.weight", "blk.0.inp_gate.weight"} <= set(a)
        assert "blk.4.attn_k.weight" not in a  # the K/V-sharing layers have no K/V of their own
        assert fa["gemma4.feed_forward_length"] == [96, 96, 96, 96, 192, 192] and fa["gemma4.attention.shared_kv_layers"] == 2
    elif shape == "unified":  # stripped to its decoder by qatkit, converted whole by llama.cpp
        assert fa["tokenizer.ggml.suppress_tokens"] == [3, 5] and "gemma4.expert_count" not in fa
    else:
        assert a["blk.0.ffn_gate_up_exps.weight"][1] == [64, 64, 4] and a["blk.0.ffn_down_exps.weight"][1] == [32, 64, 4]
        assert {"blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.scale", "blk.0.ffn_down_exps.scale", "blk.0.pre_ffw_norm_2.weight"} <= set(a)
        assert "blk.2.attn_v.weight" not in a and "blk.1.attn_v.weight" in a  # K = V on full layers
        assert fa["gemma4.attention.head_count_kv"] == [1, 1, 2, 1, 1, 2] and fa["gemma4.expert_used_count"] == 2
    # so llama.cpp computes the same: bit-identical logits from the two files
    ids = [2] + [(7 * i) % 390 + 4 for i in range(60)]
    la, lb = (chunk_logits(open_model(str(p), n_ctx=64), ids) for p in (ours, ref))
    assert np.array_equal(la, lb) and np.isfinite(la).all() and la.std() > 0


@pytest.mark.parametrize("pure", [False, True])
def test_q4_0_is_llama_quantize_byte_for_byte(model_dir, tmp_path, capsys, pure):
    """qatkit's Q4_0 file equals llama-quantize's on the F32 file, tensor for tensor; the mix is
    llama.cpp's for gemma4: both token-embedding tables at the tied-head type, 3-D experts in
    Q4_0; per_layer_model_proj, the router, norms, scales and rope_freqs left in F32."""
    shape, src, ref = model_dir
    ours, theirs = tmp_path / "qatkit-q4_0.gguf", tmp_path / "llama-q4_0.gguf"
    assert main(["export", str(src), "--format", "q4_0", *(["--pure"] if pure else []), "--out", str(ours)]) == 0
    llama_quantize(str(ref), str(theirs), ftype="q4_0", pure=pure)
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b) and [n for n in a if a[n] != b[n]] == []
    emb = "Q4_0" if pure else "Q8_0"  # Q6_K wants rows of 256: these are 64 and 192 wide
    assert a["token_embd.weight"][0] == emb and a["rope_freqs.weight"][0] == a["blk.0.layer_output_scale.weight"][0] == "F32"
    if shape == "e":
        assert a["per_layer_token_embd.weight"][0] == emb and a["per_layer_model_proj.weight"][0] == "F32"
        assert a["blk.5.ffn_down.weight"][0] == a["blk.0.proj.weight"][0] == a["blk.0.inp_gate.weight"][0] == "Q4_0"
    elif shape == "moe":
        assert a["blk.0.ffn_gate_up_exps.weight"][0] == a["blk.0.ffn_down_exps.weight"][0] == "Q4_0"
        assert a["blk.0.ffn_gate_inp.weight"][0] == a["blk.0.ffn_gate_inp.scale"][0] == a["blk.0.ffn_down_exps.scale"][0] == "F32"


@pytest.mark.parametrize("layout, words", [
    (dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
     "need layer 3 full and layer 2 sliding before them"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "llama.cpp's gemma4 takes proportional / default"),
])
def test_layouts_llama_cpp_cannot_run_are_refused(tmp_path, capsys, layout, words):
    """A config transformers accepts but llama.cpp aborts on (or qatkit cannot export yet): one
    line, exit 2, no file."""
    src = gemma4_dir(tmp_path / "m", **layout)
    out = tmp_path / "x.gguf"
    assert main(["export", str(src), "--format", "q4_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("qatkit: error: gemma4: "), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_gemma4_gguf_is_a_model_too(model_dir, tmp_path, capsys):
    """A gemma4 GGUF as MODEL (transformers 5.24 cannot read one back: qatkit's own reader): the
    converter's F32 file becomes the same model (bit-identical logits, the same tokenization) and
    exports back to the same tensors; a file missing a tensor is one line, exit 2."""
    import torch

    from qatkit.models.load import load, resolve

    shape, src, ref = model_dir
    model, tok = load(resolve(str(ref)))
    orig, otok = load(resolve(str(src)))
    from tiny_models import TEXT

    ids = otok(TEXT[:300])["input_ids"]
    assert tok(TEXT[:300])["input_ids"] == ids and type(model).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, orig(torch.tensor([ids])).logits)
    back = tmp_path / "back.gguf"
    assert main(["export", str(ref), "--format", "f32", "--out", str(back)]) == 0
    a, b = tensors(back), tensors(ref)
    assert sorted(a) == sorted(b) and [n for n in a if a[n] != b[n]] == []

    import gguf

    cut = tmp_path / "cut.gguf"
    r = GGUFReader(ref)
    w = gguf.GGUFWriter(str(cut), "gemma4")
    for k, f in r.fields.items():
        if not k.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    capsys.readouterr()
    assert main(["export", str(cut), "--format", "q4_0", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor blk.1.ffn_down.weight missing" in err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("shape", ["e", "moe", "unified"])
def test_qat_runs_in_llama_cpp_as_trained_and_resumes_exactly(tmp_path, monkeypatch, capsys, shape):
    """A short QAT run exports a Q4_0 file that llama.cpp computes exactly as the student did
    (faithful mode: float noise; plain float activations: not), whose frozen embedding tables are
    llama-quantize's bytes and whose 3-D experts trained; interrupted and resumed, it writes the
    same file."""
    from qatkit.models.load import load, resolve
    from qatkit.targets.gguf import export_gap, file_twin
    from qatkit.train import loop
    from tiny_models import TEXT

    src = gemma4_dir(tmp_path / shape, shape=shape)
    (tmp_path / "train.txt").write_text(TEXT * 6)
    args = ["train", str(src), "--data", str(tmp_path / "train.txt"), "--steps", "4", "--seq-len", "32", "--lr", "1e-3", "--export"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    qat = tmp_path / "a" / "qat-q4_0.gguf"
    source = resolve(str(src))
    teacher, _ = load(source)
    twin, types = file_twin(teacher, source.arch, str(qat))
    assert types["model.layers.4.mlp.down_proj"] == "q4_0"
    if shape != "unified":
        assert types["model.per_layer_model_projection"] == "f32" if shape == "e" else types["model.layers.0.experts.gate_up_proj"] == "q4_0"
    gap = export_gap(twin, types, str(qat), TEXT, n_tokens=96)
    assert gap["faithful"]["kld"] < 1e-9 and gap["faithful"]["same_top"] == 100.0
    assert gap["plain"]["kld"] > 100 * gap["faithful"]["kld"]  # the roundings modelled are what makes it exact
    ptq = tmp_path / "ptq.gguf"
    assert main(["export", str(src), "--format", "q4_0", "--out", str(ptq)]) == 0
    a, b = tensors(qat), tensors(ptq)
    assert a["token_embd.weight"] == b["token_embd.weight"] and a.get("per_layer_token_embd.weight") == b.get("per_layer_token_embd.weight")
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]  # the decoder did train
    if shape == "moe":
        assert a["blk.0.ffn_gate_up_exps.weight"] != b["blk.0.ffn_gate_up_exps.weight"] and a["blk.0.ffn_down_exps.weight"] != b["blk.0.ffn_down_exps.weight"]

    real_step = loop._step
    ctrl_c_at_step(monkeypatch, 3)
    assert main([*args, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(loop, "_step", real_step)
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert (tmp_path / "b" / "qat-q4_0.gguf").read_bytes() == qat.read_bytes()


def test_prepare_freezes_both_embedding_tables_at_their_file_values():
    """The per-layer embedding table (half of E2B) is frozen like the token embedding: at the
    values its Q8_0/Q6_K bytes decode to, with no gradient (so no optimizer state either)."""
    import torch

    from qatkit.config import QATConfig
    from qatkit.formats import decode, encode
    from qatkit.models.arch import arch_for_config
    from qatkit.nn import FakeQuantLinear
    from qatkit.prepare import prepare
    from tiny_models import tiny_gemma4

    model = tiny_gemma4()
    before = model.model.embed_tokens_per_layer.weight.detach().clone()
    plan = prepare(model, arch_for_config(model.config), QATConfig())
    table = model.model.embed_tokens_per_layer.weight
    assert plan["per_layer_token_embd.weight"] == "q8_0" and not table.requires_grad and not model.model.embed_tokens.weight.requires_grad
    want = decode(encode(before, "q8_0"), 8, tuple(before.shape))
    assert torch.equal(table, torch.from_numpy(want.copy())) and not torch.equal(table, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens_per_layer.weight" not in trainable and "model.per_layer_model_projection.weight" in trainable
    assert isinstance(model.model.layers[0].per_layer_input_gate, FakeQuantLinear) and not isinstance(model.model.per_layer_model_projection, FakeQuantLinear)


def test_multimodal_gemma4_is_stripped_to_its_decoder(tmp_path, capsys):
    """A Gemma4ForConditionalGeneration with vision and audio towers: qatkit keeps the decoder as
    a Gemma4ForCausalLM that computes the same logits on text, and exports it like the text model."""
    import json

    import torch
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4VisionConfig

    from qatkit.models.load import load, resolve
    from tiny_models import gemma_tokenizer, tiny_gemma4

    tok = gemma_tokenizer()
    text = tiny_gemma4(vocab_size=len(tok)).config
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                patch_size=8, position_embedding_size=64)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=(8, 4), output_proj_dims=32)
    torch.manual_seed(0)
    mm = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict(),
                                                     bos_token_id=2, eos_token_id=1, pad_token_id=0)).eval()
    src = tmp_path / "mm"
    mm.save_pretrained(src)
    tok.save_pretrained(src)
    source = resolve(str(src))
    assert source.hf_dir.name == "text-only" and source.arch.name == "gemma4"
    assert json.loads((source.hf_dir / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    model, _ = load(source)
    names = list(model.state_dict())
    assert not any(k in n for n in names for k in ("vision", "audio")) and "model.embed_tokens_per_layer.weight" in names
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in mm.model.language_model.parameters())
    ids = torch.tensor([tok("It was the best of times")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mm(input_ids=ids).logits)
    out = tmp_path / "t.gguf"
    assert main(["export", str(src), "--format", "q4_0", "--out", str(out)]) == 0
    assert "per_layer_token_embd.weight" in tensors(out) and not any(n.startswith(("v.", "a.", "mm.")) for n in tensors(out))


def test_sharded_bf16_checkpoint_and_hostile_ones(tmp_path, capsys):
    """Sharded bf16 safetensors (as Google ships them) load and export as the converter's file;
    a cut shard or an expert block of the wrong shape: one line, exit 2, no file."""
    import torch
    from safetensors.torch import load_file, save_file

    from tiny_models import gemma_tokenizer, tiny_gemma4

    tok = gemma_tokenizer()
    src = tmp_path / "bf16"
    tiny_gemma4(shape="moe", vocab_size=len(tok)).to(torch.bfloat16).save_pretrained(src, max_shard_size="200KB")
    tok.save_pretrained(src)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 2 and (src / "model.safetensors.index.json").exists()
    ours = tmp_path / "ours.gguf"
    assert main(["export", str(src), "--format", "f32", "--out", str(ours)]) == 0
    a, b = tensors(ours), tensors(llama_convert(src, tmp_path / "theirs.gguf"))
    assert sorted(a) == sorted(b) and [n for n in a if a[n] != b[n]] == []
    capsys.readouterr()

    experts = next(f for f in shards if any(k.endswith("experts.down_proj") for k in load_file(f)))
    tensors_in = load_file(experts)
    name = next(k for k in tensors_in if k.endswith("experts.down_proj"))
    save_file({**tensors_in, name: tensors_in[name][..., :16].contiguous()}, str(experts), metadata={"format": "pt"})
    out = tmp_path / "x.gguf"
    assert main(["export", str(src), "--format", "q4_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {name} is (4, 64, 16), but the model's config.json makes it (4, 64, 32)" in err, err
    experts.write_bytes(experts.read_bytes()[:1000])  # cut short
    assert main(["export", str(src), "--format", "q4_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable safetensors file" in err and not out.exists()


def test_q6_k_tables_are_frozen_and_written_as_llama_quantize_writes_them(tmp_path, capsys):
    """With rows of 256 (as E2B's 1536 and 8960), both embedding tables are Q6_K. Q6_K does not
    re-quantize its own values to the same bytes, so the student keeps the bytes of its frozen
    tables and the exporter writes them: the QAT file's tables are llama-quantize's, and llama.cpp
    still computes what the student did."""
    from qatkit.models.load import load, resolve
    from qatkit.targets.gguf import export_gap, file_twin
    from tiny_models import TEXT

    src = gemma4_dir(tmp_path / "e", hidden_size=256, hidden_size_per_layer_input=128)
    (tmp_path / "train.txt").write_text(TEXT * 6)
    assert main(["train", str(src), "--data", str(tmp_path / "train.txt"), "--steps", "2", "--seq-len", "32", "--lr", "1e-3", "--export", "--out", str(tmp_path / "r")]) == 0
    f32, ptq = tmp_path / "f32.gguf", tmp_path / "ptq.gguf"
    assert main(["export", str(src), "--format", "f32", "--out", str(f32)]) == 0
    llama_quantize(str(f32), str(ptq), ftype="q4_0")
    qat, ref = tensors(tmp_path / "r" / "qat-q4_0.gguf"), tensors(ptq)
    for name in ("token_embd.weight", "per_layer_token_embd.weight"):
        assert qat[name][0] == "Q6_K" and qat[name] == ref[name], name
    source = resolve(str(src))
    twin, types = file_twin(load(source)[0], source.arch, str(tmp_path / "r" / "qat-q4_0.gguf"))
    gap = export_gap(twin, types, str(tmp_path / "r" / "qat-q4_0.gguf"), TEXT, n_tokens=64)
    assert gap["faithful"]["kld"] < 1e-9


E2B = REFERENCE_SHAPES["E2B"]  # GEMMA4.md, section 1: the shapes alone, no weights


def test_memory_estimate_counts_e2b_as_documented_and_refuses_a_small_gpu(tmp_path, monkeypatch):
    """The estimate's parameter counts for E2B's config are GEMMA4.md's budget (4.63B text
    weights, of which the two embedding tables, 2.75B, stay frozen); a run whose estimate exceeds
    the GPU's free memory is refused before anything is loaded."""
    import torch
    from transformers import Gemma4TextConfig

    from qatkit import QatkitError
    from qatkit.config import RunConfig, TrainConfig
    from qatkit.models.load import resolve
    from qatkit.plan import training_memory
    from qatkit.train import run

    m = training_memory(Gemma4TextConfig(**E2B), batch_size=4, seq_len=512, kl_positions=0.5)
    assert m["params"] == pytest.approx(4.63e9, rel=0.01) and m["params"] - m["trainable"] == pytest.approx(2_348_810_240 + 402_653_184, rel=1e-6)
    assert 8 * 4.6e9 < m["total"] < 200e9 and m["grads_and_adamw"] == 12 * m["trainable"]
    assert training_memory(Gemma4TextConfig(**E2B), 4, 512, 0.5, grad_checkpointing=True)["activations"] < m["activations"] / 10

    src = gemma4_dir(tmp_path / "e")
    cfg = RunConfig(model=str(src), train=TrainConfig(steps=2, seq_len=32))
    assert run.check_memory(resolve(str(src)), cfg)["total"] < 1e9  # on the CPU: logged, not refused
    monkeypatch.setattr(run, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1e6, 8e9))
    with pytest.raises(QatkitError, match=r"this run needs ~0\.\d GB.*the GPU has 0\.0 of 8\.0 GB free"):
        run.check_memory(resolve(str(src)), cfg)


def test_qatkit_run_on_the_moe_shape(tmp_path, capsys):
    """`qatkit run` end to end on the 26B-style model, and the per-layer view over the Linears
    (the 3-D experts are not modules). Known limit: over the 512 tokens the run measures, the MoE
    model's faithful gap is not float noise (measured 7.6e-5 mean KLD, 95% same top; 3e-6 for a
    file trained 4 steps at lr 1e-3) as it is over 96 tokens (test above) and for the other
    shapes over 512; llama.cpp's expert products on longer batches are not modelled yet. The
    modelled roundings still take out >99% of the float model's gap."""
    import json

    from tiny_models import TEXT

    src = gemma4_dir(tmp_path / "moe", shape="moe")
    (tmp_path / "train.txt").write_text(TEXT * 6)
    (tmp_path / "held.txt").write_text(TEXT.upper() * 12)
    out = tmp_path / "run"
    assert main(["run", "--model", str(src), "--data", str(tmp_path / "train.txt"), "--text", str(tmp_path / "held.txt"),
                 "--steps", "3", "--seq-len", "32", "--chunks", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    gap = report["export_gap"]
    assert gap["kld"] < 1e-3 and gap["plain"]["kld"] > 100 * gap["kld"], gap
    assert "model.layers.0.experts.gate_up_proj" not in report["layer_errors"] and "model.layers.0.mlp.down_proj" in report["layer_errors"]
