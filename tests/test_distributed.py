"""Training under torchrun with FSDP2 (2 gloo processes on the CPU) against one process with
the same global batch, and checkpoints that cross world sizes, through real launches.

Why the files are close rather than identical: one process computes the gradient of a batch of
two sequences in one product; two processes compute one sequence each and the all-reduce adds
the halves, float additions in another order (~1e-7 relative). Adam carries that from step to
step, and a weight near a Q4_0 rounding edge may land on the other code. Over the 12 steps
here a few codes of each file move by one step and the float norms in their last bits; the
losses agree to the 6 decimals logged. (At 4 steps and lr 1e-4 the files came out identical.)

The tiny Gemma 4 is touchier: at lr 1e-3 its gradient norms sit above the clip and two runs
whose gradients differ by float noise part after a few steps, as a single process does when the
same batch is split into two accumulated halves (measured: the same 7e-7 -> 2e-5 -> 2e-4
growth of the weight difference, step by step). It is compared at lr 1e-5 over 4 steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qatkit.export.gguf import read_gguf_tensors
from tiny_models import TEXT, gemma4_dir, hf_dir

STEPS = 12
ARGS = ["--seq-len", "32", "--batch-size", "2", "--export", "--eval-every", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    hf_dir(root / "llama")
    gemma4_dir(root / "gemma4")
    data = root / "d.txt"
    data.write_text(TEXT * 6)
    env = {**os.environ, "QATKIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}

    def command(run, procs=1, *extra, model="llama", steps=STEPS, lr="1e-3"):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]
        return [*launch, "-m", "qatkit.cli", "train", str(root / model), "--data", str(data), *ARGS, "--steps", str(steps), "--lr", lr,
                "--ckpt-every", str(steps // 3), "--out", str(root / run), *extra]

    def train(run, procs=1, *extra, **kw):
        r = subprocess.run(command(run, procs, *extra, **kw), env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        train.stderr = r.stderr
        return root / run

    one = train("one")
    return root, env, command, train, one


def rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def assert_close_runs(a, b, steps=STEPS):
    """Same logged losses (6 decimals), held-out KL within 1e-6, and exported files whose Q4_0
    codes differ in under 1% of places, each by one step, and whose float tensors agree to 1e-5."""
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == sorted(rb) == list(range(-1, steps))
    for s in ra:
        assert ra[s].get("loss") == rb[s].get("loss") and ra[s].get("kl") == rb[s].get("kl"), s
        assert abs(ra[s]["held_out_kl"] - rb[s]["held_out_kl"]) <= 1e-6, s
    fa, fb = read_gguf_tensors(a / "qat-q4_0.gguf"), read_gguf_tensors(b / "qat-q4_0.gguf")
    assert fa.keys() == fb.keys()
    moved = total = 0
    for name, (kind, x, _) in fa.items():
        y = fb[name][1]
        assert fb[name][0] == kind
        x, y = np.asarray(x), np.asarray(y)
        if kind == 0:  # F32
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=name)
        elif kind == 2:  # Q4_0 blocks: fp16 scale (2 bytes) + 16 bytes of nibbles
            blocks_a, blocks_b = x.reshape(-1, 18), y.reshape(-1, 18)
            qa = np.stack([blocks_a[:, 2:] & 15, blocks_a[:, 2:] >> 4], -1).astype(int)
            qb = np.stack([blocks_b[:, 2:] & 15, blocks_b[:, 2:] >> 4], -1).astype(int)
            assert np.abs(qa - qb).max() <= 1, name
            moved += int((qa != qb).sum())
            total += qa.size
            np.testing.assert_allclose(blocks_a[:, :2].copy().view(np.float16), blocks_b[:, :2].copy().view(np.float16), rtol=1e-3, err_msg=name)
    assert total and moved / total < 0.01, (moved, total)


@pytest.fixture(scope="module")
def two(setup):
    return setup[3]("two", 2)


def test_two_processes_train_as_one_with_the_same_global_batch(setup, two):
    root, env, command, train, one = setup
    assert_close_runs(one, two)
    ckpt = two / "checkpoint"
    assert (ckpt / "latest").read_text() == f"step-{STEPS:06d}"
    # every process wrote its own shards: nothing was gathered to save
    assert sorted(p.name for p in (ckpt / f"step-{STEPS:06d}").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (two / "checkpoint.pt").exists()


def test_gemma4_trains_sharded(setup):
    """A Gemma 4 E-style model (per-layer table as its own FSDP unit, layers that read other
    layers' K/V across units) trains under 2 processes as in one."""
    root, env, command, train, one = setup
    kw = dict(model="gemma4", steps=4, lr="1e-5")
    assert_close_runs(train("g4-one", 1, **kw), train("g4-two", 2, **kw), steps=4)


def _kill_after_first_checkpoint(command, env, run_dir, procs, marker):
    p = subprocess.Popen(command(run_dir.name, procs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not marker.exists():
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    workers = _children(p.pid)
    os.kill(p.pid, signal.SIGKILL)  # the launcher only, as a user would: its workers must go with it
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _state(w) != "Z"], "workers outlived their killed launcher"
    assert 1 < len(rows(run_dir)) < STEPS + 1  # killed part-way


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_killed_launch_resumes_with_another_number_of_processes(setup):
    """kill -9 of torchrun (2 processes) after its first sharded checkpoint, then --resume in one
    process; and a one-process run killed after its checkpoint.pt, resumed by 2 processes: both
    end where the uninterrupted one-process run ends."""
    root, env, command, train, one = setup
    _kill_after_first_checkpoint(command, env, root / "cut2", 2, root / "cut2" / "checkpoint" / "latest")
    assert not (root / "cut2" / "qat-q4_0.gguf").exists()
    assert_close_runs(one, train("cut2", 1, "--resume"))
    assert re.search(r"resumed from \S+/cut2/checkpoint/step-0000(04|08) at step (4|8)", train.stderr), train.stderr[-2000:]
    _kill_after_first_checkpoint(command, env, root / "cut1", 1, root / "cut1" / "checkpoint.pt")
    assert_close_runs(one, train("cut1", 2, "--resume"))
    assert re.search(r"resumed from \S+/cut1/checkpoint.pt at step (4|8)", train.stderr), train.stderr[-2000:]


def test_what_a_sharded_run_cannot_do_is_one_line(tmp_path, capsys, monkeypatch):
    """Refused before anything loads: a global batch that does not split over the processes,
    the options that are one-process only, and commands other than train under torchrun."""
    import torch

    from qatkit import QatkitError
    from qatkit.cli import main
    from qatkit.config import RunConfig, TrainConfig
    from qatkit.train import distributed

    group = distributed.Group(rank=0, world=2, local_rank=0, device=torch.device("cpu"))
    for train, words in [(TrainConfig(batch_size=3), "must split evenly over the 2 processes"), (TrainConfig(batch_size=2, teacher_topk=8), "one process"),
                         (TrainConfig(batch_size=2, faithful=True), "one process at a time")]:
        with pytest.raises(QatkitError, match=words):
            distributed.check_supported(RunConfig(model="x", train=train), group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--quick", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qatkit run runs in one process; under torchrun use qatkit train" in err[0], err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_the_memory_per_device_from_a_config_alone(tmp_path, capsys):
    """`qatkit train CONFIG.json --dry-run --world-size 8` reads no weights (there are none) and
    prints plan.training_memory's figures for 1 and 8 devices: E2B's 4.63B parameters, and per
    device on 8 a fraction of one device's need (the sharded weights and AdamW state)."""
    from transformers import Gemma4TextConfig

    from qatkit.cli import main
    from qatkit.models.gemma4 import REFERENCE_SHAPES
    from qatkit.plan import training_memory

    path = tmp_path / "e2b.json"
    Gemma4TextConfig(**REFERENCE_SHAPES["E2B"]).to_json_file(path)
    capsys.readouterr()
    args = ["--batch-size", "8", "--seq-len", "512", "--kl-positions", "0.5", "--grad-checkpointing", "--teacher-dtype", "bfloat16"]
    assert main(["train", str(path), "--dry-run", "--world-size", "8", *args]) == 0
    out = capsys.readouterr().out
    assert "4.63B parameters, 1.88B trained" in out and "teacher bfloat16" in out
    total = {int(w): float(v) for w, v in zip((1, 8), [line.split()[1:] for line in out.splitlines() if line.startswith("total")][0])}
    config = Gemma4TextConfig(**REFERENCE_SHAPES["E2B"])
    for w in (1, 8):
        assert total[w] == pytest.approx(training_memory(config, 8, 512, 0.5, True, world=w, teacher_dtype="bfloat16")["total"] / 1e9, abs=0.006)
    assert total[8] < total[1] / 4
    gathered = [line for line in out.splitlines() if line.startswith("gathered")][0].split()
    assert float(gathered[1]) == 0 and float(gathered[2]) > 0  # FSDP holds whole layers only when there is more than one device


class _Payload:  # a pickle that runs a command when loaded
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["metadata runs code", "metadata cut", "shard cut", "trainer.json broken", "latest points nowhere"])
def test_a_damaged_sharded_checkpoint_is_one_line_and_runs_nothing(setup, two, tmp_path, capsys, damage):
    """--resume on a sharded checkpoint that was cut, broken, or crafted: one line, exit 2, no
    file exported, and a pickle that names a command is refused without running it (DCP itself
    would unpickle .metadata with plain pickle)."""
    import pickle
    import shutil

    from qatkit.cli import main

    root = setup[0]
    run = tmp_path / "run"
    shutil.copytree(two, run)
    (run / "qat-q4_0.gguf").unlink()
    step = run / "checkpoint" / f"step-{STEPS:06d}"
    marker = tmp_path / "PWNED"
    if damage == "metadata runs code":
        (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    elif damage == "metadata cut":
        data = (step / ".metadata").read_bytes()
        (step / ".metadata").write_bytes(data[: len(data) // 2])
    elif damage == "shard cut":
        data = (step / "__1_0.distcp").read_bytes()
        (step / "__1_0.distcp").write_bytes(data[: len(data) // 3])
    elif damage == "trainer.json broken":
        (step / "trainer.json").write_text('{"step": 12, "batches": ')
    else:
        (run / "checkpoint" / "latest").write_text("step-999999")
    capsys.readouterr()
    code = main(["train", str(root / "llama"), "--data", str(root / "d.txt"), *ARGS, "--steps", str(STEPS), "--lr", "1e-3", "--ckpt-every", "4",
                 "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("qatkit: error: ") and "checkpoint" in err[0], err
    assert not marker.exists() and not (run / "qat-q4_0.gguf").exists()


def test_optimizer_settings_are_read_weights_only(tmp_path):
    """The non-tensor items of a sharded checkpoint (the optimizer's settings) go through torch's
    weights-only unpickler, not DCP's weights_only=False."""
    import io
    import pickle

    import torch

    from qatkit.train.distributed import _weights_only_planner

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _weights_only_planner().load_bytes(None, buf)
    assert not marker.exists()


def test_dry_run_of_a_multimodal_directory_sizes_its_language_model(tmp_path, capsys):
    """A multimodal checkpoint (Gemma 4 12B's kind) is sized as what qatkit trains of it, its
    text decoder, from config.json alone: one table, no traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatkit.cli import main
    from qatkit.plan import training_memory
    from tiny_models import gemma4_dir

    src = gemma4_dir(tmp_path / "unified", shape="unified")
    capsys.readouterr()
    assert main(["train", str(src), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and out.count("\ntotal") == 1
    full = AutoConfig.from_pretrained(src)
    text_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(full.get_text_config()).parameters())
    assert training_memory(full, 1, 32)["params"] == text_params
