"""The settings exist once (qatkit/config.py): the CLI's options are generated from the config
dataclasses, parse back to the same configs, and the rules between fields hold for every way a
config is built."""

import dataclasses

import pytest

from qatkit import QatkitError
from qatkit.cli import _run_config, build_parser, main
from qatkit.config import QATConfig, RunConfig, TrainConfig, flag_of


def parse(*argv):
    return build_parser().parse_args(["train", "m", "--out", "r", *argv])


def test_every_setting_is_an_option_with_help_and_the_dataclass_default():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {a.dest: a for a in train_parser._actions}
    all_fields = [f for cls in (QATConfig, TrainConfig, RunConfig) for f in dataclasses.fields(cls)]
    on_cli = {f.name for f in all_fields if f.metadata["cli"]}
    for f in all_fields:
        if not f.metadata["cli"]:
            assert f.name not in options or f.name in on_cli | {"model"}, f.name  # QATConfig.seed is TrainConfig's --seed
        else:
            a = options[f.name]
            assert flag_of(f) in a.option_strings and len(f.metadata["help"]) > 10 and a.help == f.metadata["help"], f.name
    cfg = _run_config(parse())
    assert cfg.qat == QATConfig() and cfg.train == TrainConfig() and cfg == RunConfig(model="m")


def test_options_parse_into_the_configs():
    cfg = _run_config(parse("--format", "mobile", "--weights", "int8", "--int2", "*.down_proj", "*.up_proj", "--learn-scales",
                            "--steps", "40", "--teacher-cache", "/c", "--seed", "3", "--data", "a.txt", "--held-out", "2"))
    assert cfg.qat.fmt == "mobile" and cfg.qat.mobile_weights == "int8" and cfg.qat.int2 == ("*.down_proj", "*.up_proj")
    assert cfg.qat.learn_scales and cfg.qat.seed == 3 and cfg.train.seed == 3  # one --seed for both
    assert cfg.train.steps == 40 and cfg.train.teacher_cache_dir == "/c" and cfg.train.warmup_steps == 4
    assert cfg.data == ["a.txt"] and cfg.data_free == 0.0 and cfg.held_out == 2  # with --data, no sampling unless asked


def test_derived_defaults_come_from_the_other_fields():
    assert RunConfig(model="m").data_free == pytest.approx(2 / 3) and RunConfig(model="m", data=["x"]).data_free == 0
    assert TrainConfig(steps=20).warmup_steps == 2 and TrainConfig(steps=3).warmup_steps == 1 and TrainConfig(steps=500).warmup_steps == 5
    assert TrainConfig(steps=20, warmup_steps=7).warmup_steps == 7
    # a run directory's config.json reads back to the same config (the derived values stored)
    cfg = RunConfig(model="m", qat=QATConfig(fmt="mobile", int2=("*.a",)), train=TrainConfig(steps=30))
    assert RunConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("build, words", [
    (lambda: QATConfig(fmt="q4_0", int2=("*.down_proj",)), "--int2 is a mobile-format option"),
    (lambda: QATConfig(fmt="q8_0", activations="static"), "--activations is a mobile-format option"),
    (lambda: QATConfig(fmt="mobile", pure=True), "--pure is llama-quantize's"),
    (lambda: QATConfig(fmt="q8_0", learn_scales=True), "--learn-scales is for --format q4_0 and mobile"),
    (lambda: QATConfig(fmt="mobile", mobile_weights="int4g32", activations="static"), "per-channel weights"),
    (lambda: QATConfig(fmt="mobile", mobile_weights="int3"), "--weights 'int3': choose from int4, int4g32, int8"),
    (lambda: QATConfig(fmt="q5_k"), "--format 'q5_k': choose from q4_0, q8_0, mobile"),
    (lambda: TrainConfig(kl_positions=0), "--kl-positions"),
    (lambda: TrainConfig(eval_every=0), "--eval-every must be >= 1"),
    (lambda: RunConfig(model="m", data_free=1.5), "--data-free 1.5"),
    (lambda: RunConfig(model="m", qat=QATConfig(fmt="mobile"), train=TrainConfig(faithful=True)), "--faithful rounds as llama.cpp does"),
])
def test_rules_between_fields(build, words):
    with pytest.raises(QatkitError, match=words.replace("(", r"\(").replace("*", r"\*")):
        build()


def test_cli_refuses_a_rule_in_one_line(capsys, tmp_path):
    """The same rules, met on the command line: exit 2, one line, nothing written."""
    for argv, words in (
        (["train", "m", "--out", str(tmp_path / "r"), "--int2", "*.down_proj"], "--int2 is a mobile-format option; add --format mobile (got --format q4_0)"),
        (["export", "m", "--format", "q8_0", "--weights", "int8", "--out", str(tmp_path / "x.gguf")], "--weights is a mobile-format option"),
        (["run", "--model", "m", "--out", str(tmp_path / "o"), "--format", "mobile", "--faithful"], "--faithful rounds as llama.cpp does"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_help_shows_what_a_default_means():
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "optimizer steps (default: 150)" in text  # `qatkit run`'s own length
    assert "(default: False)" not in text and "(default: ())" not in text and "(default: None)" not in text
    assert "mobile format (ExecuTorch/XNNPACK" in text and "training text:" in text
