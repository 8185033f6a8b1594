"""Tiny random models of each supported family, built from a transformers config, with a small
byte-level BPE tokenizer trained in the test: seconds to build, real code paths throughout."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity. The quick brown fox "
    "jumps over the lazy dog while the five boxing wizards jump quickly. "
) * 8


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int = 320, hidden: int = 64, layers: int = 2, **kw):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    common.update(kw)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(**{"sliding_window": 512, **common}, head_dim=32, query_pre_attn_scalar=32, tie_word_embeddings=True)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so their conversion is really tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# --------------------------------------------------------------------------------- Gemma 4
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma's own vocabulary


def gemma_tokenizer(vocab_size: int = 400):
    """A tiny BPE with byte fallback in Gemma's style ('▁' for spaces, <0xNN> byte tokens), the
    kind llama.cpp's converter reads for Gemma 4 (gguf-py's LlamaHfVocab)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([TEXT.replace(" ", "▁")], trainer)
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# E-style: per-layer embeddings, the last 2 layers sharing K/V (producers: layer 3 full, layer 2
# sliding, as llama.cpp requires), double-wide MLP on them, a 2:1 sliding pattern, softcap 30.
GEMMA4_E = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=16, final_logit_softcapping=30.0, hidden_size_per_layer_input=32, num_kv_shared_layers=2, use_double_wide_mlp=True,
)


# 26B-style: no per-layer embeddings or K/V sharing; a MoE block (4 experts, top 2) beside the dense
# MLP in every layer; full layers with K = V (no v_proj) and their own KV-head count.
GEMMA4_MOE = dict(
    GEMMA4_E, hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    attention_k_eq_v=True, num_global_key_value_heads=2, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
)
GEMMA4_SHAPES = {"e": GEMMA4_E, "moe": GEMMA4_MOE}  # and "unified": gemma4_unified()


def tiny_gemma4(seed: int = 0, vocab_size: int = 400, **kw):
    """A random Gemma4ForCausalLM (`gemma4_text`) of shape `shape` ('e' or 'moe'; `kw` overrides);
    norms, layer scalars and the rest of the 1-D tensors randomised so that their export is tested."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    shape = GEMMA4_SHAPES[kw.pop("shape", "e")]
    cfg = Gemma4TextConfig(**{**shape, **kw}, vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, max_position_embeddings=1024,
                           rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.0)
    return model


def gemma4_dir(path, seed: int = 0, **kw):
    """A tiny Gemma 4 and its tokenizer saved as a Hugging Face directory at `path`; shape
    'unified' is the 12B kind: a Gemma4UnifiedForConditionalGeneration (decoder without per-layer
    embeddings or MoE, tiny vision and audio embedders), with suppress_tokens in its generation config."""
    tok = gemma_tokenizer()
    if kw.get("shape") == "unified":
        gemma4_unified(seed, tok).save_pretrained(path)
        import json

        # llama.cpp's converter reads moe_intermediate_size unconditionally (conversion/gemma.py,
        # find_hparam without optional): a unified text config has no such field, so say None
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["moe_intermediate_size"] = None
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        tiny_gemma4(seed, vocab_size=len(tok), **kw).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gemma4_unified(seed: int, tok):
    from transformers import Gemma4UnifiedAudioConfig, Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedTextConfig, Gemma4UnifiedVisionConfig

    moe_only = ("hidden_size_per_layer_input", "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size")
    text = Gemma4UnifiedTextConfig(**{k: v for k, v in GEMMA4_MOE.items() if k not in moe_only}, vocab_size=len(tok), max_position_embeddings=1024,
                                   rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma4UnifiedVisionConfig(patch_size=8, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=64)
    cfg = Gemma4UnifiedConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=Gemma4UnifiedAudioConfig(audio_embed_dim=16).to_dict(),
                              bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.suppress_tokens = [3, 5]
    return model


# ------------------------------------------------------------------ helpers shared by test files
def hf_dir(path, family="llama", **kw):
    """A tiny model and its tokenizer saved as a Hugging Face directory at `path`."""
    model = tiny_model(family, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def distill_setup(seed=0, **qat):
    """(teacher, prepared student, training sequences, held-out sequences) of a tiny llama whose
    weights are sharpened, so that quantization costs something."""
    import copy

    from qatkit.models.arch import arch_for_config
    from qatkit.prepare import QATConfig, prepare
    from qatkit.train.data import pack, split

    teacher = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4)
    student = copy.deepcopy(teacher)
    prepare(student, arch_for_config(teacher.config), QATConfig(**qat))
    seqs = pack(tiny_tokenizer(), [TEXT * 3], seq_len=32, vocab_size=teacher.config.vocab_size)
    return teacher, student, *split(seqs, 2, seed=0)


def export_gguf(model, tokenizer, path, fmt, pure=False):
    """Write `model` as a GGUF of `fmt` with llama.cpp's per-tensor policy; returns the plan."""
    from qatkit.export.gguf import gguf_tensors, hf_metadata, write_gguf
    from qatkit.models.arch import arch_for_config
    from qatkit.plan import default_plan

    arch = arch_for_config(model.config)
    tensors = gguf_tensors(model, arch)
    plan = default_plan({k: tuple(v.shape) for k, v in tensors.items()}, fmt, pure)
    write_gguf(path, tensors, plan, hf_metadata(model, tokenizer, arch), fmt, progress=False)
    return plan


def logits_np(model, ids):
    """A torch model's float32 logits on one sequence, as numpy (positions, vocab)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def kld_np(p_logits, q_logits):
    """mean KL(p || q) over positions, float64 (qatkit.metrics.compare)."""
    from qatkit.metrics import compare

    return compare(p_logits, q_logits)["kld"]


def ctrl_c_at_step(monkeypatch, n: int) -> list:
    """Make the training loop's n-th optimizer step raise KeyboardInterrupt (as Ctrl-C would);
    returns the list its calls are counted in. monkeypatch.undo() or a new setattr restores it."""
    from qatkit.train import loop

    real_step, calls = loop._step, []

    def step(*a):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(*a)

    monkeypatch.setattr(loop, "_step", step)
    return calls


def tiny_assistant(seed: int = 1, vocab_size: int = 400, backbone_hidden_size: int = 64, **kw):
    """A random Gemma 4 MTP drafter (Gemma4AssistantForCausalLM) that pairs with `tiny_gemma4`'s
    E shape: the target's KV heads, head sizes and window, two layers (sliding, full) reading
    the target's last two layers' K/V. Weights scaled so that its logits are not flat (std ~3)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                head_dim=32, global_head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, use_double_wide_mlp=False, enable_moe_block=False,
                final_logit_softcapping=30.0, max_position_embeddings=1024, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                tie_word_embeddings=True)
    use_ordered = kw.pop("use_ordered_embeddings", False)
    cfg = Gemma4AssistantConfig(text_config=Gemma4TextConfig(**{**text, **kw}), backbone_hidden_size=backbone_hidden_size,
                                use_ordered_embeddings=use_ordered)
    torch.manual_seed(seed)
    m = Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" not in name:
                p.mul_(3.0)
        for layer in m.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.0)
        m.model.embed_tokens.weight.mul_(30.0)
    return m


def assistant_dir(path, seed: int = 1, **kw):
    """`tiny_assistant` and its (the target's) tokenizer saved as a Hugging Face directory."""
    tiny_assistant(seed, **kw).save_pretrained(path)
    gemma_tokenizer().save_pretrained(path)
    return Path(path)
