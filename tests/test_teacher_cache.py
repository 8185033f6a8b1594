"""The teacher top-k cache: the loss it gives, what it stores, and that a warm cache trains exactly
as a cold one without running the teacher."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qatkit import QatkitError
from qatkit.train.loop import TrainConfig, _head, distill_loss, kl_per_position, positions, train
from qatkit.train.teacher_cache import TeacherCache, topk_kl
from tiny_models import distill_setup


def test_topk_kl_bounds_and_equals_full_kl():
    gen = torch.Generator().manual_seed(0)
    t = F.log_softmax(3 * torch.randn(5, 40, generator=gen), -1)
    s = F.log_softmax(3 * torch.randn(5, 40, generator=gen), -1)
    full = kl_per_position(t, s)
    top = t.topk(40, -1)
    assert torch.allclose(topk_kl(top.values, top.indices, s), full, atol=1e-5)  # k = V: nothing merged
    previous = torch.zeros(5)
    for k in (1, 4, 16, 39):  # merging outcomes can only lower a KL, and finer is never lower
        top = t.topk(k, -1)
        kl = topk_kl(top.values, top.indices, s)
        assert (kl <= full + 1e-4).all() and (kl >= previous - 1e-4).all()
        assert (kl < full - 1e-4).all() if k == 16 else True  # a tail of 24 tokens really merges
        previous = kl
    assert torch.allclose(previous, full, atol=1e-5)  # a one-token tail is that token


def test_cache_loss_is_topk_kl_of_the_teacher(tmp_path):
    teacher, student, tr, held = distill_setup()
    cfg = TrainConfig(seq_len=32, kl_positions=0.5, teacher_topk=8)
    cache = TeacherCache(teacher, _head, tr, 8, root=tmp_path)
    x = tr[:2]
    pos = positions(32, 0.5, torch.Generator().manual_seed(1))
    loss, stats = distill_loss(student, teacher, x, pos, cfg, cache)
    with torch.no_grad():
        t = F.log_softmax(_head(teacher, teacher.model(x).last_hidden_state[:, pos]), -1)
        s = F.log_softmax(_head(student, student.model(x).last_hidden_state[:, pos]), -1)
    top = t.topk(8, -1)
    assert torch.allclose(loss, topk_kl(top.values, top.indices, s).mean(), atol=1e-6)
    full, _ = distill_loss(student, teacher, x, pos, TrainConfig(seq_len=32, kl_positions=0.5))
    assert loss < full  # the tail merged
    assert cache.misses == 2 and cache.hits == 0
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert meta["k"] == 8 and meta["n_seqs"] == len(tr) and meta["positions"] == 31
    filled = np.load(next(tmp_path.glob("*/filled.npy")))
    assert filled.sum() == 2  # the rest are filled when first used


def test_warm_cache_trains_identically_without_the_teacher(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, kl_positions=0.5, eval_every=100,
                      teacher_topk=16, teacher_cache_dir=str(tmp_path / "cache"))
    teacher, cold, tr, held = distill_setup()
    train(cold, teacher, tr, None, cfg, tmp_path / "cold", progress=False)
    teacher, warm, tr, held = distill_setup()
    calls = []
    teacher.model.register_forward_hook(lambda *a: calls.append(1))
    train(warm, teacher, tr, None, cfg, tmp_path / "warm", progress=False)
    assert calls == []  # every sequence came from the cache
    for (n, a), b in zip(cold.named_parameters(), warm.parameters()):
        assert torch.equal(a, b), n
    teacher, plain, tr, held = distill_setup()
    train(plain, teacher, tr, None, TrainConfig(**{**cfg.__dict__, "teacher_topk": 0}), tmp_path / "plain", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), warm.parameters()))  # the loss really changed


def test_cache_refuses_other_data_and_garbage(tmp_path):
    teacher, student, tr, held = distill_setup()
    cache = TeacherCache(teacher, _head, tr, 4, root=tmp_path)
    with pytest.raises(QatkitError, match="not among the cached"):
        cache.lookup(held, torch.arange(3))
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.norm.weight.add_(1)
    assert TeacherCache(other, _head, tr, 4, root=tmp_path).dir != cache.dir  # another teacher, another key
    (cache.dir / "logp.npy").write_bytes(b"not an array")
    with pytest.raises(QatkitError, match="unreadable teacher cache"):
        TeacherCache(teacher, _head, tr, 4, root=tmp_path)
    with pytest.raises(QatkitError, match="top-k"):
        TeacherCache(teacher, _head, tr, 0, root=tmp_path)
    blocked = TeacherCache(teacher, _head, tr, 5, root=tmp_path / "other").dir
    for f in blocked.iterdir():  # a directory without meta.json, and not empty: in the way
        f.unlink() if f.name == "meta.json" else None
    with pytest.raises(QatkitError, match="incomplete teacher cache"):
        TeacherCache(teacher, _head, tr, 5, root=tmp_path / "other")
    assert not [p for p in (tmp_path / "other").iterdir() if p != blocked]  # no temporary left


def test_fingerprint_sees_every_tensor_including_scalars():
    from qatkit.cache import fingerprint
    from tiny_models import tiny_model

    m = tiny_model("gemma3")  # holds 0-dim buffers (the embedding scale)
    assert any(b.dim() == 0 for b in m.buffers())
    a = fingerprint(m)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert fingerprint(m) != a
