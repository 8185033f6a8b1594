"""The training loop on a tiny model: the distillation loss falls, and a run stopped half-way and
resumed ends with exactly the weights of an uninterrupted run."""

import json

import pytest
import torch

from qatkit import QatkitError
from qatkit.models.arch import arch_for_config
from qatkit.train import loop
from qatkit.train.loop import TrainConfig, lr_at, train
from tiny_models import distill_setup


def test_loss_falls(tmp_path):
    teacher, student, tr, held = distill_setup()
    cfg = TrainConfig(steps=30, batch_size=2, seq_len=32, lr=3e-4, warmup_steps=2, kl_positions=1.0, eval_every=30)
    rows = train(student, teacher, tr, held, cfg, tmp_path, progress=False)
    before, after = rows[0]["held_out_kl"], rows[-1]["held_out_kl"]
    assert rows[0]["step"] == -1 and rows[-1]["step"] == 29
    assert after < 0.7 * before, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(rows))


@pytest.mark.parametrize("learn_scales", [False, True])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, learn_scales):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, kl_positions=0.5, grad_accum=2, ckpt_every=3, eval_every=3)
    teacher, a, tr, held = distill_setup(learn_scales=learn_scales)
    train(a, teacher, tr, held, cfg, tmp_path / "a", progress=False)

    teacher, b, tr, held = distill_setup(learn_scales=learn_scales)
    real_step, calls = loop._step, []

    def killed_in_step_5(*args):  # Ctrl-C in the middle of step 5 (no checkpoint falls there)
        calls.append(1)
        if len(calls) == 5:
            next(args[3])  # a micro-batch was already drawn when the interrupt came
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "_step", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(b, teacher, tr, held, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(loop, "_step", real_step)
    teacher, c, tr, held = distill_setup(learn_scales=learn_scales)  # a fresh process resumes it
    train(c, teacher, tr, held, cfg, tmp_path / "b", resume=True, progress=False)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [-1, 0, 1, 2, 3, 4, 5]


def test_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_bad_settings():
    with pytest.raises(QatkitError, match="--kl-positions"):
        TrainConfig(kl_positions=0)
    with pytest.raises(QatkitError, match="--steps must be >= 1"):
        TrainConfig(steps=0)


def test_grad_checkpointing_changes_nothing_but_memory(tmp_path):
    """Recomputing activations in backward must give the very same weights, and must really be on."""
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, kl_positions=1.0, eval_every=3)
    teacher, a, tr, held = distill_setup(learn_scales=True)
    train(a, teacher, tr, held, cfg, tmp_path / "a", progress=False)
    teacher, b, tr, held = distill_setup(learn_scales=True)
    calls = []
    for layer in b.model.layers:  # (the layer's own hooks are not re-run by the recompute)
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    train(b, teacher, tr, held, TrainConfig(**{**cfg.__dict__, "grad_checkpointing": True}), tmp_path / "b", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # each layer runs twice per training step (forward, then again in backward), once per evaluation
    n_layers, evals = len(b.model.layers), 2 * len(held)
    assert len(calls) == n_layers * (2 * cfg.steps + evals), len(calls)


def test_faithful_training_rounds_like_llama_cpp(tmp_path, monkeypatch):
    """--faithful: the student's forward in the loss is the llama.cpp-rounded one (not the plain
    one), gradients pass straight through, and the run trains."""
    from qatkit.prepare import linear_weight_types, model_plan
    from qatkit.runtime.faithful import llamacpp_faithful

    teacher, student, tr, held = distill_setup()
    arch = arch_for_config(teacher.config)
    types = linear_weight_types(student, arch, model_plan(student, arch, "q4_0"))
    assert types["model.layers.0.mlp.down_proj"] == "q4_0" and set(types) >= {"lm_head"}
    x, pos = tr[:2], torch.arange(31)
    cfg = TrainConfig(seq_len=32, kl_positions=1.0, faithful=True)
    ctx = lambda: llamacpp_faithful(student, types, exact=False)  # noqa: E731
    loss, _ = loop.distill_loss(student, teacher, x, pos, cfg, student_context=ctx)
    plain, _ = loop.distill_loss(student, teacher, x, pos, cfg)
    with torch.no_grad():
        t = torch.log_softmax(loop._head(teacher, teacher.model(x).last_hidden_state[:, pos]), -1)
        with llamacpp_faithful(student, types, exact=False):
            s = torch.log_softmax(loop._head(student, student.model(x).last_hidden_state[:, pos]), -1)
    assert torch.allclose(loss, loop.kl_per_position(t, s).mean(), rtol=1e-6)
    assert not torch.equal(loss, plain)
    loss.backward()
    g = student.model.layers[0].mlp.down_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0

    entered = []
    real = loop.partial

    def counting(fn, *a, **k):
        def make():
            entered.append(1)
            return fn(*a, **k)
        return make

    monkeypatch.setattr(loop, "partial", counting)
    teacher, student, tr, held = distill_setup()
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, grad_accum=2, faithful=True, eval_every=100)
    rows = train(student, teacher, tr, None, cfg, tmp_path, progress=False, weight_types=types)
    assert len(entered) == 6 and all(r["kl"] > 0 for r in rows)
    monkeypatch.setattr(loop, "partial", real)
    with pytest.raises(QatkitError, match="weight type"):
        train(student, teacher, tr, None, cfg, tmp_path / "b", progress=False)
    with pytest.raises(QatkitError, match="drop --grad-checkpointing or --faithful"):
        TrainConfig(faithful=True, grad_checkpointing=True)


def test_a_non_finite_step_is_skipped_and_never_written(tmp_path, monkeypatch, caplog):
    """Step 2's loss turns NaN: that step changes nothing (its weights equal a 2-step run's, the
    optimizer did not count it), it is logged and marked in the metrics, and training goes on;
    ten in a row stop the run in one line."""
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, eval_every=100)
    teacher, a, tr, held = distill_setup()
    train(a, teacher, tr, held, cfg, tmp_path / "a", progress=False)

    real_loss = loop.distill_loss

    def nan_at(steps):
        calls = []

        def loss(*args, **kw):
            calls.append(1)
            value, stats = real_loss(*args, **kw)
            return (value * float("nan"), stats) if len(calls) - 1 in steps else (value, stats)
        return loss

    monkeypatch.setattr(loop, "distill_loss", nan_at({2}))
    teacher, b, tr, held = distill_setup()
    rows = train(b, teacher, tr, held, TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "b", progress=False)
    assert rows[-1]["step"] == 2 and rows[-1]["skipped"] and not any(r.get("skipped") for r in rows[:-1])
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the NaN step moved nothing
    state = loop.read_checkpoint(tmp_path / "b" / "checkpoint.pt")  # and the file holds finite numbers
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["params"].values())
    assert "not finite; the step is skipped" in caplog.text

    monkeypatch.setattr(loop, "distill_loss", nan_at(set(range(100))))
    teacher, c, tr, held = distill_setup()
    with pytest.raises(QatkitError, match="10 steps in a row had non-finite"):
        train(c, teacher, tr, held, TrainConfig(**{**cfg.__dict__, "steps": 20}), tmp_path / "c", progress=False)


def test_a_hostile_checkpoint_is_refused_without_running_it(tmp_path):
    """Checkpoints are read with torch's weights-only unpickler: a file whose pickle would run code
    is refused in one line (and the code does not run); so are cut and foreign files."""

    teacher, s, tr, held = distill_setup()
    opt = loop.make_optimizer(s, TrainConfig())
    batches = loop.Batches(tr, 2, 0)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "params": {}, "optimizer": {}, "batches": Evil()}, evil)
    good = tmp_path / "good.pt"
    loop.save_checkpoint(good, s, opt, 3, batches, TrainConfig())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("hello")
    for path, why in ((evil, "not a readable qatkit checkpoint"), (cut, "not a readable"), (text, "not a readable")):
        with pytest.raises(QatkitError, match=why):
            loop.load_checkpoint(path, s, opt, batches)
    assert not marker.exists()
    assert loop.load_checkpoint(good, s, opt, batches) == 3  # the real one loads under the same rules


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing a checkpoint: the previous checkpoint is byte for byte what
    it was, no temporary is left, and the CLI would say so in one line (qatkit.cli catches it)."""
    import errno

    teacher, s, tr, held = distill_setup()
    opt = loop.make_optimizer(s, TrainConfig())
    batches = loop.Batches(tr, 2, 0)
    ckpt = tmp_path / "checkpoint.pt"
    loop.save_checkpoint(ckpt, s, opt, 1, batches, TrainConfig())
    before = ckpt.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as h:  # half of it made it, then the disk filled
            h.truncate(len(before) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        loop.save_checkpoint(ckpt, s, opt, 2, batches, TrainConfig())
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_checkpoints_are_written_while_training_goes_on(tmp_path, monkeypatch):
    """The checkpoint after step 2 is written in the background: its write waits until step 3
    has run (it would wait in vain, and fail, if the loop waited for the write), and what it
    writes is still the state after step 2 (the weights of a 2-step run), not the live tensors."""
    import threading

    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, eval_every=100)
    teacher, a, tr, held = distill_setup()
    train(a, teacher, tr, held, cfg, tmp_path / "a", progress=False)

    third_step = threading.Event()
    written = []
    real_write, real_step = loop.write_checkpoint, loop._step

    def late_write(path, state):
        written.append((third_step.wait(timeout=60), state["step"], {k: v.clone() for k, v in state["params"].items()}))
        real_write(path, state)

    def step(*args):  # (student, teacher, opt, batches, step, ...)
        out = real_step(*args)
        if args[4] == 2:  # the third step has run: the checkpoint after two steps was taken before it
            third_step.set()
        return out

    monkeypatch.setattr(loop, "write_checkpoint", late_write)
    monkeypatch.setattr(loop, "_step", step)
    teacher, b, tr, held = distill_setup()
    train(b, teacher, tr, held, TrainConfig(**{**cfg.__dict__, "steps": 4, "ckpt_every": 2}), tmp_path / "b", progress=False)
    overlapped, at, params = written[0]
    assert overlapped and at == 2
    assert all(torch.equal(params[n], p) for n, p in a.named_parameters() if n in params)
    assert loop.read_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 4  # the last one is on disk when train returns


def test_bfloat16_teacher_moves_the_target_a_little_and_the_student_stays_float32(tmp_path, private_cache):
    """--teacher-dtype bfloat16: the teacher computes in bfloat16 (the logged losses differ from a
    float32 teacher's, by little), the student trains and exports in float32 all the same."""
    from qatkit.config import QATConfig, RunConfig
    from qatkit.train.run import qat_run
    from tiny_models import TEXT, hf_dir

    src = hf_dir(tmp_path / "m")
    (tmp_path / "d.txt").write_text(TEXT * 6)
    from qatkit.models.load import load, resolve

    source = resolve(str(src))
    teacher, tok = load(source)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = RunConfig(model=str(src), data=[str(tmp_path / "d.txt")], qat=QATConfig(),
                        train=TrainConfig(steps=2, seq_len=32, lr=1e-4, eval_every=1, teacher_dtype=dtype))
        runs[dtype] = qat_run(cfg, tmp_path / dtype, progress=False, loaded=(source, teacher, tok))
    # the caller's teacher is left in float32: `qatkit run` measures the export gap with it
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    f32, bf16 = (runs[d]["metrics"] for d in ("float32", "bfloat16"))
    assert {p.dtype for p in runs["bfloat16"]["student"].parameters()} == {torch.float32}
    for a, b in zip(f32, bf16):
        key = "held_out_kl" if a["step"] == -1 else "kl"
        assert a[key] != b[key] and abs(a[key] - b[key]) < 0.5 * a[key] + 1e-3, (a, b)
