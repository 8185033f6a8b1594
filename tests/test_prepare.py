"""prepare -> (train) -> convert -> export: the student's fake-quant forward is exactly what the
exported file holds, learned scales included; boundary weights are settled without changing PTQ."""

import copy

import pytest
import torch

from qatkit.export.gguf import gguf_tensors, hf_metadata, load_gguf_weights, write_gguf
from qatkit.formats import q4_0
from qatkit.models.arch import arch_for_config
from qatkit.nn import FakeQuantLinear
from qatkit.prepare import QATConfig, convert, prepare, settle_boundaries
from tiny_models import TEXT, tiny_model, tiny_tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("learn_scales", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_student_forward_equals_exported_file(family, learn_scales, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family)
    arch = arch_for_config(model.config)
    tok = tiny_tokenizer()
    student = copy.deepcopy(model)
    plan = prepare(student, arch, QATConfig(learn_scales=learn_scales))
    untied_head = not model.config.tie_word_embeddings  # llama here: its own Q8_0 output head trains too
    assert sum(isinstance(m, FakeQuantLinear) for m in student.modules()) == 7 * model.config.num_hidden_layers + untied_head
    assert not student.get_input_embeddings().weight.requires_grad
    # a few optimizer steps so latent weights and scales move off their initial values
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    ids = tok(TEXT)["input_ids"][:64]
    for _ in range(3):
        loss = student(torch.tensor([ids]), labels=torch.tensor([ids])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = logits(student, ids)
    scales = convert(student, arch)
    assert bool(scales) == learn_scales
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    path = tmp_path / "s.gguf"
    write_gguf(path, gguf_tensors(student, arch), plan, hf_metadata(student, tok, arch), "q4_0", scales, progress=False)
    twin = copy.deepcopy(model)
    load_gguf_weights(twin, arch, path)
    assert torch.equal(logits(twin, ids), trained)  # the file holds exactly the trained numbers


def test_learned_scale_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    fq = FakeQuantLinear.from_linear(lin, "q4_0", learn_scales=True)
    assert fq.weight is lin.weight
    assert torch.equal(fq.quantized_weight(), q4_0.fake_quant(lin.weight))  # ggml's scales at start
    x = torch.randn(4, 64)
    fq(x).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    assert lin.weight.grad.abs().sum() > 0


def test_learned_scale_gradient_is_lsq():
    """d out / d d = (q - 8) - w/d inside the grid, (q - 8) where clipped; w's gradient stops
    where clipped."""
    w = torch.linspace(-1.0, 1.0, 32).reshape(1, 32)
    d = torch.tensor([[0.1]])  # grid -0.8 .. 0.7: the ends of w are clipped
    lin = torch.nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fq = FakeQuantLinear.from_linear(lin, "q4_0", learn_scales=True)
    with torch.no_grad():
        fq.scale.copy_(d)
    fq.quantized_weight().sum().backward()
    codes, d16 = q4_0.quantize(w, d)
    q = codes.float() - 8
    x = w / d16.float()
    inside = (x >= -8.5) & (x < 7.5)
    assert 0 < inside.sum() < 32
    expected = torch.where(inside, q - x, q).sum()
    assert torch.allclose(fq.scale.grad, expected.reshape(1, 1), atol=1e-5)
    assert torch.equal(lin.weight.grad, inside.float())


def test_settle_boundaries_keeps_ptq_and_leaves_no_edge():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    d = q4_0.absmax_scale(w).unsqueeze(-1)
    # put every other weight exactly on a Q4_0 edge: x * (1/d) + 8.5 an integer
    b = w.reshape(64, -1, 32)
    k = torch.round(b / d) + 0.5
    edge = k * d
    edge = torch.where((edge.abs() < d.abs() * 7.4) & (torch.arange(32) % 2 == 0), edge, b)
    w = edge.reshape(64, 256).contiguous()
    codes, scales = q4_0.quantize(w)
    inv = 1.0 / q4_0.absmax_scale(w).unsqueeze(-1)
    z = w.reshape(64, -1, 32) * inv + 8.5
    before = int((z == torch.floor(z)).sum())
    assert before > 1000
    moved = settle_boundaries(w, "q4_0", torch.Generator().manual_seed(0))
    assert moved == before
    codes2, scales2 = q4_0.quantize(w)
    assert torch.equal(codes, codes2) and torch.equal(scales, scales2)
    z2 = w.reshape(64, -1, 32) * inv + 8.5
    assert int((z2 == torch.floor(z2)).sum()) == 0


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_plan_shapes_are_the_exported_tensors_shapes(family):
    """The plan's shapes (computed without building the tensors) are those the exporter writes."""
    from qatkit.export.gguf import gguf_tensors
    from qatkit.plan import gguf_shapes

    model = tiny_model(family)
    arch = arch_for_config(model.config)
    assert gguf_shapes(model, arch) == {k: tuple(v.shape) for k, v in gguf_tensors(model, arch).items()}
