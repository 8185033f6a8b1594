"""The command line on tiny models: success paths write real files; bad input exits 2 with one
line on stderr and leaves no output file behind."""

import math

import numpy as np
import pytest
import torch

from qatkit.cli import main
from qatkit.export.gguf import read_gguf_tensors
from tiny_gguf import TinyConfig, write_tiny_llama
from tiny_models import TEXT, hf_dir, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _cache(private_cache):
    return private_cache


def run(capsys, *args):
    capsys.readouterr()  # drop what building the fixtures printed
    return main(list(args))


def one_line_error(capsys, *want):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qatkit: error: "), err
    for w in want:
        assert w in err[0], err[0]
    return err[0]


def test_export_hf_dir_then_eval_json(tmp_path, capsys):
    src = hf_dir(tmp_path / "m")
    assert main(["export", str(src), "--format", "f32", "--out", str(tmp_path / "f32.gguf")]) == 0
    assert main(["export", str(src), "--format", "q4_0", "--out", str(tmp_path / "q4.gguf")]) == 0
    assert main(["export", str(src), "--format", "q4_0", "--ptq", "llama.cpp", "--out", str(tmp_path / "ptq.gguf")]) == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    capsys.readouterr()
    files = [str(tmp_path / n) for n in ("f32.gguf", "q4.gguf", "ptq.gguf")]
    assert main(["eval", *files, "--ref", files[0], "--text", str(text), "--ctx", "128", "--json"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == files
    for r in rows:
        assert {"path", "ppl", "kld", "same_top", "tokens", "file_bytes"} <= set(r)
        assert math.isfinite(r["ppl"]) and r["tokens"] > 0
    assert rows[0]["kld"] < 1e-9 and rows[0]["same_top"] == 100
    assert rows[1]["kld"] > 0
    # qatkit's own PTQ and llama.cpp's quantizer made the same file content
    assert rows[1]["ppl"] == rows[2]["ppl"] and rows[1]["kld"] == rows[2]["kld"]


def test_width_not_multiple_of_32_falls_back_or_refuses(tmp_path, capsys, caplog):
    src = hf_dir(tmp_path / "m", hidden=48)  # 48-wide rows: not whole Q4_0 blocks
    out = tmp_path / "q.gguf"
    assert main(["export", str(src), "--format", "q4_0", "--out", str(out)]) == 0
    assert "writing them as f16" in caplog.text and "blk.0.attn_q.weight (48, 48)" in caplog.text
    types = {k: v[0] for k, v in read_gguf_tensors(out).items()}
    assert types["blk.0.attn_q.weight"] == 1  # f16: its rows are 48 wide
    assert types["blk.0.ffn_down.weight"] == 2  # q4_0: its rows are 96 wide
    out2 = tmp_path / "pure.gguf"
    assert run(capsys, "export", str(src), "--format", "q4_0", "--pure", "--out", str(out2)) == 2
    one_line_error(capsys, "row width 48", "not a multiple of 32")
    assert not out2.exists() and not any(p.name.startswith(".pure") for p in tmp_path.iterdir())


def test_nan_weights_refused(tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    out = tmp_path / "x.gguf"
    assert run(capsys, "export", str(tmp_path / "m"), "--out", str(out)) == 2
    one_line_error(capsys, "up_proj", "NaN")
    assert not out.exists()


def test_unknown_architecture_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    assert run(capsys, "export", str(tmp_path / "g"), "--out", str(tmp_path / "x.gguf")) == 2
    one_line_error(capsys, "unsupported architecture", "gpt2")
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama(gguf, TinyConfig())
    data = gguf.read_bytes().replace(b"llama", b"grok1", 1)  # general.architecture value
    bad = tmp_path / "grok.gguf"
    bad.write_bytes(data)
    assert run(capsys, "export", str(bad), "--out", str(tmp_path / "y.gguf")) == 2
    one_line_error(capsys, "unsupported GGUF architecture")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_gguf", "layers", "width"])
def test_corrupt_gguf_refused(tmp_path, capsys, damage):
    good = tmp_path / "good.gguf"
    write_tiny_llama(good, TinyConfig())
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage in ("layers", "width"):  # one hyper-parameter damaged (block_count 536870913 came from the fuzz test)
        key = {"layers": b"llama.block_count", "width": b"llama.embedding_length"}[damage]
        at = data.index(key) + len(key) + 4  # after the key: its u32 type tag, then the u32 value
        bad.write_bytes(data[:at] + (536870913).to_bytes(4, "little") + data[at + 4 :])
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(data[:8] + np.random.default_rng(0).bytes(len(data) - 8))
    else:
        bad.write_bytes(b"PK\x03\x04" + data[4:])
    out = tmp_path / "out.gguf"
    assert run(capsys, "export", str(bad), "--out", str(out)) == 2
    one_line_error(capsys, "bad.gguf")
    assert not out.exists()
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    assert run(capsys, "eval", str(bad), "--text", str(text)) == 2
    one_line_error(capsys, "bad.gguf")
    # nothing left behind: no output, no partial file (the cache folder may or may not exist)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["bad.gguf", "good.gguf", "t.txt"]


def test_eval_bad_text(tmp_path, capsys):
    good = tmp_path / "good.gguf"
    write_tiny_llama(good, TinyConfig())
    assert run(capsys, "eval", str(good), "--text", str(tmp_path / "missing.txt")) == 2
    one_line_error(capsys, "no such file")
    (tmp_path / "empty.txt").write_text("  \n")
    assert run(capsys, "eval", str(good), "--text", str(tmp_path / "empty.txt")) == 2
    one_line_error(capsys, "empty")
    (tmp_path / "short.txt").write_text("a few words")
    assert run(capsys, "eval", str(good), "--text", str(tmp_path / "short.txt"), "--ctx", "256") == 2
    one_line_error(capsys, "tokens")


def test_model_not_found_and_bad_out_name(tmp_path, capsys):
    assert run(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")) == 2
    one_line_error(capsys, "not found")
    assert run(capsys, "run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--quick") == 2
    one_line_error(capsys, "not found")
    assert run(capsys, "train", str(tmp_path / "nope"), "--out", str(tmp_path / "run")) == 2
    one_line_error(capsys, "not found")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    assert run(capsys, "export", str(tmp_path), "--out", str(tmp_path / "x.bin")) == 2
    one_line_error(capsys, ".gguf")


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "export", "eval", "gemma3-270m", "Exit codes"):
        assert cmd in out


def test_train_export_and_resume(tmp_path, capsys):
    src = hf_dir(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(TEXT * 6)
    run_dir = tmp_path / "run"
    args = ["train", str(src), "--data", str(data), "--steps", "4", "--seq-len", "32", "--lr", "1e-4", "--out", str(run_dir), "--export", "--ckpt-every", "2"]
    assert main(args) == 0
    assert {"config.json", "checkpoint.pt", "metrics.jsonl", "qat-q4_0.gguf"} <= {p.name for p in run_dir.iterdir()}
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3] and "held_out_kl" in rows[-1]
    types = {k: v[0] for k, v in read_gguf_tensors(run_dir / "qat-q4_0.gguf").items()}
    assert types["blk.0.ffn_up.weight"] == 2
    # resuming a finished run trains nothing more and exports the same file
    before = (run_dir / "qat-q4_0.gguf").read_bytes()
    assert main(args + ["--resume"]) == 0
    assert (run_dir / "qat-q4_0.gguf").read_bytes() == before


@pytest.mark.parametrize("case", ["empty", "short", "mismatch"])
def test_train_bad_data(tmp_path, capsys, case):
    src = hf_dir(tmp_path / "m", vocab_size=100 if case == "mismatch" else 320)
    data = tmp_path / "d.txt"
    data.write_text({"empty": " \n", "short": "a few words", "mismatch": TEXT}[case])
    run_dir = tmp_path / "run"
    assert run(capsys, "train", str(src), "--data", str(data), "--steps", "2", "--seq-len", "32", "--out", str(run_dir), "--export") == 2
    one_line_error(capsys, {"empty": "no text", "short": "too little text", "mismatch": "tokenizer/model mismatch"}[case])
    assert not run_dir.exists()  # not even an empty run directory


def test_train_data_free(tmp_path, capsys):
    """LLM-QAT: training sequences sampled from the teacher itself, no text given."""
    src = hf_dir(tmp_path / "m")
    run_dir = tmp_path / "run"
    assert main(["train", str(src), "--data-free", "1", "--steps", "2", "--seq-len", "16", "--out", str(run_dir)]) == 0
    import json

    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data_free"] == 1.0 and cfg["data"] == []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1]


@pytest.mark.parametrize("config, words", [
    ("{not json", "config.json: not valid JSON"),
    ('{"model_type": "nonexistent_xyz"}', "model type 'nonexistent_xyz' is not one transformers knows"),
    ('{"model_type": "gpt2", "n_layer": 1}', "unsupported architecture 'gpt2'"),
])
def test_bad_config_is_one_line_and_nothing_else(tmp_path, config, words):
    """In a fresh process, as a user runs it: a broken config.json, a model type transformers does
    not know, or one qatkit does not support -> exit 2 and exactly one line on stderr (no
    traceback, no import noise of torch, torchao or transformers before it), nothing written."""
    import subprocess
    import sys

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(config)
    r = subprocess.run([sys.executable, "-c", "import sys; from qatkit.cli import main; sys.exit(main())", "export", str(tmp_path / "m"),
                        "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qatkit: error: ") and words in r.stderr, r.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("lines", [4, 9])  # step 2 logged (its checkpoint is being written), step 7 logged
def test_kill_9_then_resume_writes_the_same_file(tmp_path, lines):
    """`qatkit train` killed with SIGKILL (no handler runs) part-way, then --resume, exports the
    same bytes as a run never interrupted; the checkpoint the kill found is whole (atomic,
    fsynced), and nothing partial is left beside it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = hf_dir(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(TEXT * 6)
    env = {**os.environ, "QATKIT_CACHE": str(tmp_path / "cache")}

    def args(run):
        return [sys.executable, "-m", "qatkit.cli", "train", str(src), "--data", str(data), "--steps", "12", "--seq-len", "32", "--lr", "1e-4",
                "--out", str(run), "--export", "--ckpt-every", "3", "--eval-every", "1"]

    whole = tmp_path / "whole"
    assert subprocess.run(args(whole), env=env, capture_output=True, timeout=600).returncode == 0
    cut = tmp_path / "cut"
    p = subprocess.Popen(args(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # a write the kill cut may have left its hidden temporary, never a half checkpoint
    assert not (cut / "qat-q4_0.gguf").exists() and all(q.name.startswith(".checkpoint.pt.") for q in cut.iterdir() if q.name.endswith(".tmp"))
    r = subprocess.run([*args(cut), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cut / "qat-q4_0.gguf").read_bytes() == (whole / "qat-q4_0.gguf").read_bytes()
    assert not [q.name for q in cut.iterdir() if q.name.endswith(".tmp")]  # the resumed run cleared it


@pytest.mark.parametrize("key, value, words", [
    ("num_attention_heads", 0, "transformers refuses it"),  # its config class divides by it
    ("pad_token_id", 10**6, "cannot build the model"),  # an AssertionError in nn.Embedding (found by tests/test_fuzz.py)
    ("hidden_size", -4, "cannot build the model"),  # a negative dimension
    ("num_hidden_layers", 2**31, "num_hidden_layers is 2147483648, but the weights hold 2 layers"),  # would build for hours
])
def test_damaged_config_value_is_one_line(tmp_path, capsys, key, value, words):
    import json

    src = hf_dir(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    assert run(capsys, "export", str(src), "--format", "q8_0", "--out", str(out)) == 2
    one_line_error(capsys, words)
    assert not out.exists()


def test_eval_of_a_model_past_float_range_says_inf(tmp_path, capsys):
    """A model whose logits are astronomically wrong (an output head of scale 1e20: a bit-flipped
    GGUF in the fuzz run of `qatkit eval` was such a file) scores perplexity inf, not a traceback
    from exp() overflowing in the progress line."""
    import json

    path = tmp_path / "wild.gguf"
    write_tiny_llama(path, TinyConfig(out_std=1e20))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    assert run(capsys, "eval", str(path), "--text", str(text), "--json") == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert math.isinf(row["ppl"]) and row["tokens"] > 0
