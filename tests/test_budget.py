"""The memory-budget planner: its byte arithmetic against files the exporter really writes, its
knapsack against brute force, its refusals (an impossible budget exits 2 with the smallest
reachable size; a plan of another model is refused), and the config-only mode on Gemma 4 E2B's
shapes."""

import itertools
import json
import subprocess
import sys

import pytest

from qatkit import QatkitError
from qatkit.budget import Entry, fit, load_plan, mobile_bytes, parse_size, predicted_loss, save_plan
from qatkit.planner import plan_budget
from tiny_models import hf_dir


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("800 MB") == 8 * 10**8 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("4096") == 4096
    with pytest.raises(QatkitError):
        parse_size("lots")


def test_knapsack_matches_brute_force_on_small_cases():
    """The greedy choice is never worse than 1.3x the best mix found by enumeration, always fits,
    and spends the budget where the loss per byte is largest."""
    import random

    rng = random.Random(0)
    for _ in range(30):
        entries = []
        for i in range(5):
            b = sorted(rng.sample(range(10, 200), 3))
            loss = sorted((rng.random() * 10 for _ in range(2)), reverse=True) + [0.0]
            entries.append(Entry(f"t{i}", (1,), "linear", dict(zip(("a", "b", "c"), b)), 1, dict(zip(("a", "b", "c"), loss))))
        lo = sum(e.options["a"] for e in entries)
        budget = lo + rng.randrange(0, 400)
        choice, total = fit(entries, budget)
        assert total == sum(e.options[choice[e.name]] for e in entries) <= budget
        best = min(sum(e.loss[c] for e, c in zip(entries, combo)) for combo in itertools.product("abc", repeat=5)
                   if sum(e.options[c] for e, c in zip(entries, combo)) <= budget)
        assert predicted_loss(entries, choice) <= 1.3 * best + 1e-9


def test_gguf_plans_are_the_exported_files_to_the_byte(tmp_path, capsys):
    """Three budgets on a tiny llama: the planner's predicted bytes equal the size of the file
    `qatkit export --plan` writes; the lowest budget is every tensor at Q4_0, the highest
    every one at its highest format; a budget below the lowest exits 2 with one line."""
    from qatkit.cli import main

    model = hf_dir(tmp_path / "m", "llama", hidden=64, layers=2)
    lowest = plan_budget(str(model), 10**9, "q4_0", progress=False)  # measured losses (weights are read)
    assert lowest["losses"].startswith("measured")
    sizes = {e.name: e.options for e in lowest["entries"]}
    lo = lowest["overhead"] + sum(min(o.values()) for o in sizes.values())
    hi = lowest["overhead"] + sum(max(o.values()) for o in sizes.values())
    assert lowest["bytes"] == hi  # a budget above everything takes every tensor at its highest
    for i, budget in enumerate((lo, (lo + hi) // 2, hi)):
        r = plan_budget(str(model), budget, "q4_0", progress=False)
        assert r["bytes"] <= budget
        plan = tmp_path / f"plan{i}.json"
        save_plan(plan, "q4_0", r["choice"], {"predicted_bytes": r["bytes"]})
        out = tmp_path / f"f{i}.gguf"
        assert main(["export", str(model), "--format", "q4_0", "--plan", str(plan), "--out", str(out)]) == 0
        assert out.stat().st_size == r["bytes"], (budget, out.stat().st_size, r["bytes"])
        if i == 0:
            assert {f for n, f in r["choice"].items() if sizes[n] and len(sizes[n]) > 1} == {"q4_0"}
        if i == 1:
            assert len(set(r["choice"].values()) - {"f32"}) > 1  # a real mix
    capsys.readouterr()
    assert main(["plan", str(model), "--budget", str(lo - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest" in err[0] and str(lo) in err[0]


def test_a_plan_of_another_model_is_refused(tmp_path):
    from qatkit.config import QATConfig
    from qatkit.models.arch import arch_for_config
    from qatkit.prepare import prepare
    from tiny_models import tiny_model

    model = hf_dir(tmp_path / "m", "llama", hidden=64, layers=2)
    r = plan_budget(str(model), 10**9, "q4_0", sizes_only=True)
    plan = tmp_path / "p.json"
    save_plan(plan, "q4_0", r["choice"], {})
    other = tiny_model("llama", layers=3)
    with pytest.raises(QatkitError, match="not this model's"):
        prepare(other, arch_for_config(other.config), QATConfig(plan=str(plan)))
    with pytest.raises(QatkitError, match="for the q4_0 format, not mobile"):
        load_plan(plan, "mobile")
    bad = json.loads(plan.read_text())
    bad["tensors"]["blk.0.attn_q.weight"] = "q6_k"  # a Linear qatkit cannot train at Q6_K
    plan.write_text(json.dumps(bad))
    same = tiny_model("llama", layers=2)
    with pytest.raises(QatkitError, match="cannot be q6_k"):
        prepare(same, arch_for_config(same.config), QATConfig(plan=str(plan)))
    with pytest.raises(QatkitError, match="both choose"):
        QATConfig(fmt="mobile", plan=str(plan), embedding="int4")


def test_mobile_plans_are_the_exported_files_to_the_byte(tmp_path, capsys):
    """Three budgets on a tiny Gemma 3 (tied int4/int8 table): `qatkit plan --format mobile`
    predicts the bytes of the .pte and .ptd that `qatkit export --format mobile --plan` writes,
    to the byte: the weights by the byte rule (the program's constants, named data and .ptd
    segments: checked apart), the program around them measured by the planner's own export; the
    top budget takes the int8 table (another program: more lookup bytes, no nibble flip), the
    lowest every weight at int4; a budget one byte under the smallest file exits 2 saying it."""
    pytest.importorskip("executorch")
    from qatkit.cli import main
    from qatkit.runtime.executorch import program_bytes, weight_bytes

    model = hf_dir(tmp_path / "m", "gemma3", hidden=64, layers=1)
    weights = {e.name: e.options for e in plan_budget(str(model), 10**9, "mobile", sizes_only=True)["entries"]}
    low_w = sum(min(o.values()) for o in weights.values())
    high_w = sum(max(o.values()) for o in weights.values())
    results, stored = {}, {}
    for i, budget in enumerate((10**9, (low_w + high_w) // 2 + 34_000, None)):  # (the program: ~33 kB)
        if budget is None:  # the smallest file: the lowest plan with its own program
            capsys.readouterr()
            assert main(["plan", str(model), "--format", "mobile", "--budget", "1000"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "smallest" in err[0]
            budget = int(err[0].split("(")[1].split(" bytes")[0])
            assert main(["plan", str(model), "--format", "mobile", "--budget", str(budget - 1)]) == 2
        plan = tmp_path / f"plan{i}.json"
        assert main(["plan", str(model), "--format", "mobile", "--budget", str(budget), "--out", str(plan)]) == 0
        data = json.loads(plan.read_text())
        assert data["predicted_bytes"] <= budget and data["losses"].startswith("measured")
        out = tmp_path / f"p{i}.pte"
        assert main(["export", str(model), "--format", "mobile", "--plan", str(plan), "--out", str(out)]) == 0
        assert program_bytes(out) == data["predicted_bytes"], (i, program_bytes(out), data["predicted_bytes"])
        results[i] = data["tensors"]
        stored[i] = weight_bytes(out) - sum(weights[n][f] for n, f in data["tensors"].items())
    assert stored[0] == stored[1] == stored[2]  # the weights by the rule: the exporter's own constants alone are left
    assert results[0]["model.embed_tokens"] == "int8" and set(results[0].values()) - {"f32"} == {"int8"}
    assert set(results[2].values()) - {"f32"} == {"int4"}  # the smallest: every weight at its lowest
    assert len(set(results[1].values()) - {"f32"}) > 1  # a real mix


def test_e2b_text_only_from_its_config(tmp_path, capsys):
    """Gemma 4 E2B's shapes (no weights): the mobile format cannot reach 1 GB (int4 is the least
    XNNPACK stores a Linear in), and the planner says the smallest it reaches; the q4_0 GGUF
    plan at 3 GB prints bits per parameter over E2B's 4.63B text weights."""
    from test_gemma4 import E2B

    from qatkit.cli import main

    cfg = tmp_path / "e2b.json"
    cfg.write_text(json.dumps({"model_type": "gemma4_text", **E2B}))
    assert main(["plan", str(cfg), "--budget", "1GB", "--format", "mobile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest" in err[0]
    assert main(["plan", str(cfg), "--budget", "3GB", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "4.629B parameters" in out and "prior" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == "q4_0" and data["predicted_bytes"] <= 3e9 and len(data["tensors"]) > 500


def test_mobile_bytes_rule():
    assert mobile_bytes((10, 64), "int4") == 10 * 32 + 40 and mobile_bytes((10, 65), "int4") == 10 * 33 + 40
    assert mobile_bytes((10, 64), "int8") == 640 + 40
    assert mobile_bytes((10, 64), "int2") == 10 * 16 + 40  # lookup tables only: ExecuTorch's embedding_2bit, four codes a byte


def test_cli_plan_help_teaches():
    out = subprocess.run([sys.executable, "-m", "qatkit.cli", "plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--budget" in out.stdout and "smallest reachable" in out.stdout


def test_train_with_a_plan_exports_that_plan(tmp_path):
    """qatkit train --plan: the student trains under the planner's mix and the exported file
    stores every tensor in the format the plan gave it (a Q8_0 Linear among Q4_0 ones)."""
    from qatkit.cli import main
    from qatkit.export.gguf import read_gguf_tensors
    from qatkit.formats import BY_GGML_TYPE

    model = hf_dir(tmp_path / "m", "llama", hidden=64, layers=2)
    r = plan_budget(str(model), 10**9, "q4_0", sizes_only=True)
    choice = {n: ("q8_0" if n == "blk.1.ffn_down.weight" else "q4_0" if f in ("q8_0", "q6_k") else f) for n, f in r["choice"].items()}
    plan = tmp_path / "plan.json"
    save_plan(plan, "q4_0", choice, {})
    from tiny_models import TEXT

    (tmp_path / "t.txt").write_text(TEXT * 20)
    rc = main(["train", str(model), "--format", "q4_0", "--plan", str(plan), "--steps", "2", "--seq-len", "32", "--data", str(tmp_path / "t.txt"),
               "--out", str(tmp_path / "run"), "--export"])
    assert rc == 0
    types = {n: BY_GGML_TYPE[t].name for n, (t, _, _) in read_gguf_tensors(tmp_path / "run" / "qat-q4_0.gguf").items()}
    assert types == choice
