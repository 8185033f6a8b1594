"""`qatkit run` end to end on a tiny model: report.json holds every figure, and its numbers agree
with `qatkit eval` on the same files."""

import json

import pytest

from qatkit.cli import main
from tiny_models import TEXT, ctrl_c_at_step, hf_dir


@pytest.fixture(autouse=True)
def _cache(private_cache):
    return private_cache


def run_args(tmp_path, out, *extra) -> list[str]:
    """`qatkit run` on a tiny llama (6 steps of 32 tokens) with its own training and held-out text."""
    src = hf_dir(tmp_path / "m", hidden=64)
    (tmp_path / "train.txt").write_text(TEXT * 6)
    (tmp_path / "held.txt").write_text(TEXT.upper() * 12)
    return ["run", "--model", str(src), "--data", str(tmp_path / "train.txt"), "--text", str(tmp_path / "held.txt"),
            "--steps", "6", "--seq-len", "32", "--chunks", "1", "--out", str(out), *extra]


def test_run_report_agrees_with_eval(tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(tmp_path, out, "--lr", "3e-4")
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("files", "gap_closure", "export_gap", "steps", "tokens_seen", "train_seconds", "wall_s", "peak_rss_mb"):
        assert key in report, key
    assert set(report["files"]) == {"teacher", "ptq", "qat"}
    assert list(report["domains"]) == ["held"] and report["held_out_domains"] == ["held"]
    for f in report["files"].values():
        assert {"path", "ppl", "kld", "same_top", "tokens", "file_bytes", "bits_per_weight", "decode_tps", "prompt_tps", "load_rss_mb"} <= set(f)
        assert f["decode_tps"] > 0 and f["load_rss_mb"] > 0
    f = report["files"]
    assert f["teacher"]["bits_per_weight"] > 30 and f["qat"]["bits_per_weight"] < 12  # F32 vs a Q4_0 mix
    assert len(report["layer_errors"]) == 14 and all(0 < e["ptq"] < 1 for e in report["layer_errors"].values())
    for name in ("report.md", "training.png", "layers.png", "size_ppl.png"):
        assert (out / name).stat().st_size > 500, name
    md = (out / "report.md").read_text()
    assert "Gap closure" in md and "llama.cpp on the QAT file vs the trained student" in md and "activation roundings modelled" in md
    assert report["runtime"] == "llama.cpp" and "plan" not in report
    assert report["tokens_seen"] == 6 * 32
    # the same numbers from `qatkit eval --json`
    capsys.readouterr()
    paths = [report["files"][k]["path"] for k in ("ptq", "qat")]
    assert main(["eval", *paths, "--ref", report["files"]["teacher"]["path"], "--text", str(tmp_path / "held.txt"), "--chunks", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, key in zip(rows, ("ptq", "qat")):
        assert row["ppl"] == report["domains"]["held"][key]["ppl"] and row["kld"] == report["domains"]["held"][key]["kld"]
        assert row["ppl"] == pytest.approx(report["files"][key]["ppl"], rel=1e-12)
    assert report["export_gap"]["faithful"]["same_top"] == 100.0


def test_run_on_the_suite_reports_each_domain_as_eval_does(tmp_path, capsys):
    """With the default training text (pydoc + code, a share sampled from the teacher), `docs` is
    in-domain and left out of the headline; every domain's figures are `qatkit eval`'s on the
    same files, and the headline is the mean over the held-out domains."""
    out = tmp_path / "run"
    args = run_args(tmp_path, out, "--lr", "3e-4", "--domains", "fiction", "email", "docs")
    i = args.index("--data")
    del args[i : i + 2]
    i = args.index("--text")
    del args[i : i + 2]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Gap closure on held-out domains" in printed and "docs (in-domain)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["data"] == [] and 0 < report["config"]["data_free"] < 1
    d = report["domains"]
    assert list(d) == ["fiction", "email", "docs"] and [n for n in d if d[n]["in_domain"]] == ["docs"]
    assert report["held_out_domains"] == ["fiction", "email"]
    assert report["gap_closure"] == pytest.approx((d["fiction"]["gap_closure"] + d["email"]["gap_closure"]) / 2)
    assert report["in_domain_gap_closure"] == d["docs"]["gap_closure"]
    md = (out / "report.md").read_text()
    assert "In-domain (the training text's own source: docs)" in md and (out / "domains.png").stat().st_size > 500
    files = report["files"]
    assert main(["eval", files["ptq"]["path"], files["qat"]["path"], "--ref", files["teacher"]["path"], "--domains", "fiction", "email", "docs", "--chunks", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["domain"], r["path"]) for r in rows] == [(n, files[k]["path"]) for n in d for k in ("ptq", "qat")]
    for r in rows:
        key = "ptq" if r["path"] == files["ptq"]["path"] else "qat"
        assert (r["ppl"], r["kld"], r["same_top"]) == (d[r["domain"]][key]["ppl"], d[r["domain"]][key]["kld"], d[r["domain"]][key]["same_top"])


def test_run_interrupted_then_resumed(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: `qatkit run` exits 130 keeping its checkpoint; `--resume` continues
    from it instead of starting over, and the report comes out."""
    from qatkit.train import loop

    out = tmp_path / "run"
    args = run_args(tmp_path, out, "--ckpt-every", "100")
    real_step = loop._step
    calls = ctrl_c_at_step(monkeypatch, 4)
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "train" / "checkpoint.pt").exists() and not (out / "report.json").exists()
    calls.clear()
    monkeypatch.setattr(loop, "_step", lambda *a: (calls.append(1), real_step(*a))[1])
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 3  # steps 3, 4, 5 only: the first three were kept
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3, 4, 5]
    assert json.loads((out / "report.json").read_text())["steps"] == 6


def test_run_mobile_report_agrees_with_eval(tmp_path, capsys):
    """`qatkit run --format mobile`: PTQ and QAT programs scored in ExecuTorch; the report's
    figures are what `qatkit eval` says of the same .pte files; the training kept its plan and its
    learned static activation scales. (One test for the whole mobile path: each ExecuTorch
    lowering costs ~45 s on 2 cores.)"""
    pytest.importorskip("executorch", reason="the mobile extra is not installed")
    out = tmp_path / "run"
    args = run_args(tmp_path, out, "--lr", "3e-4", "--format", "mobile", "--learn-scales", "--activations", "static", "--int2", "*.down_proj")
    assert main(args) == 0
    assert "Gap closure on held-out domains" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    f = report["files"]
    assert set(f) == {"teacher", "ptq", "qat"} and report["plan"]["activations"] == "static"
    assert f["ptq"]["path"].endswith(".pte") and f["qat"]["path"] == str(out / "train" / "qat-mobile.pte")
    assert f["ptq"]["file_bytes"] == f["qat"]["file_bytes"] or abs(f["ptq"]["file_bytes"] - f["qat"]["file_bytes"]) < 2000
    assert report["export_gap"]["kld"] < 1e-6 and "decode_tps" in f["qat"]  # a random tiny model may stop at once
    for name in ("report.md", "training.png", "size_ppl.png"):
        assert (out / name).stat().st_size > 500, name
    md = (out / "report.md").read_text()
    assert "Plan: int4 Linears (int2 *.down_proj), embedding int8 per row, static int8 activations." in md
    assert "ExecuTorch (XNNPACK) on the QAT file vs the trained student" in md and "| float teacher (torch) |" in md
    assert not (out / "layers.png").exists() and "load RSS" not in md  # what the target does not measure is left out
    capsys.readouterr()
    assert main(["eval", f["ptq"]["path"], f["qat"]["path"], "--text", str(tmp_path / "held.txt"), "--chunks", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, key in zip(rows, ("ptq", "qat")):
        assert row["ppl"] == report["domains"]["held"][key]["ppl"], (row, f[key])
    config = json.loads((out / "train" / "config.json").read_text())  # what `qatkit train --format mobile` keeps to resume from
    assert config["qat"]["fmt"] == "mobile" and config["qat"]["int2"] == ["*.down_proj"] and config["qat"]["activations"] == "static"
    import torch

    ckpt = torch.load(out / "train" / "checkpoint.pt", weights_only=False)
    learned = [v for k, v in ckpt["params"].items() if k.endswith("act_log_scale")]
    assert learned and all(torch.isfinite(v).all() for v in learned)  # calibrated, then trained
    # (resuming is the same orchestrator for both targets: test_run_interrupted_then_resumed)
    assert f["ptq"]["path"].startswith(str(tmp_path / "cache"))  # the untrained program is cached beside the model
