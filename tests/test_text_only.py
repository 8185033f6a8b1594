"""Text-only stripping of a multimodal checkpoint (a tiny Gemma 3 with a vision tower): the
language model alone computes what the multimodal model computes on text, the vision weights
are gone from what qatkit writes, and a damaged checkpoint exits 2."""

import json

import pytest
import torch

from qatkit import QatkitError
from qatkit.models.load import load, resolve
from tiny_models import tiny_config, tiny_tokenizer


def multimodal(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = tiny_config("gemma3")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    m = Gemma3ForConditionalGeneration(cfg).eval()
    src = tmp_path / "mm"
    m.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return m, src


def test_text_only_model_computes_what_the_multimodal_one_does(tmp_path, monkeypatch):
    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache"))
    mm, src = multimodal(tmp_path)
    source = resolve(src)
    assert source.hf_dir.name == "text-only" and source.arch.name == "gemma3"
    config = json.loads((source.hf_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    model, tok = load(source)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in n or "projector" in n for n in model.state_dict())
    n_text = sum(p.numel() for p in mm.model.language_model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_text < sum(p.numel() for p in mm.parameters())
    ids = torch.tensor([tok("It was the best of times")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mm(input_ids=ids).logits)
    assert resolve(src).hf_dir == source.hf_dir  # cached: written once


def test_text_only_export_to_gguf_and_bad_checkpoints(tmp_path, monkeypatch, capsys):
    from gguf import GGUFReader

    from qatkit.cli import main

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache"))
    _, src = multimodal(tmp_path)
    out = tmp_path / "t.gguf"
    assert main(["export", str(src), "--format", "q8_0", "--out", str(out)]) == 0
    names = [t.name for t in GGUFReader(out).tensors]
    assert "blk.1.ffn_down.weight" in names and not any("v." in n[:2] or "mm" in n for n in names)
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:500])  # cut short
    capsys.readouterr()
    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache2"))
    assert main(["export", str(src), "--format", "q8_0", "--out", str(tmp_path / "u.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable safetensors" in err[0], err
    assert not (tmp_path / "u.gguf").exists() and not list((tmp_path / "cache2").rglob("*.safetensors"))
    (src / "model.safetensors").unlink()
    with pytest.raises(QatkitError, match="safetensors"):
        resolve(src)
