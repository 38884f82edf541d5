import tomllib

import pytest

from pipeline.config import PRESETS, load_config, to_toml
from pipeline.errors import UserError


def test_defaults_are_the_tiny_preset():
    cfg = load_config()
    assert cfg.name == "tiny" and cfg.scale == 4
    assert cfg.model.teacher == "edsr_baseline" and cfg.data.eval == "embedded"


def test_paper_presets_use_the_paper_models_and_patches():
    for name, teacher in (("edsr_paper", "edsr"), ("rcan_paper", "rcan")):
        cfg = load_config(name)
        assert cfg.model.teacher == teacher
        assert cfg.train.lr_patch == 48 and cfg.train.lr == 1e-4 and cfg.train.schedule == "step"


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["train.iters=200", "train.lr=2e-4", "train.schedule=step", "scale=2",
                                 "train.step_milestones=[10, 20]", "data.train=some/folder"])
    assert cfg.train.iters == 200 and cfg.train.lr == 2e-4 and cfg.scale == 2
    assert cfg.train.step_milestones == [10, 20] and cfg.data.train == "some/folder"
    assert load_config(overrides=["train.lr=1"]).train.lr == 1.0  # an int where a float is expected is fine


def test_file_then_overrides(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('name = "exp"\n[train]\niters = 50\nbatch = 4\n')
    cfg = load_config("tiny", f, ["train.batch=8"])
    assert (cfg.name, cfg.train.iters, cfg.train.batch) == ("exp", 50, 8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.iterz=3", "unknown config key 'train.iterz'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.iters=1.5", "'train.iters': expected int"),
        ("train.iters=true", "'train.iters': expected int"),
        ("train.lr=fast", "'train.lr': expected float"),
        ("train.schedule=linear", "'train.schedule'"),
        ("train=3", "'train' is a section"),
        ("scale=5", "'scale'"),
        ("train.iters=0", "'train.iters' must be > 0"),
        ("train.step_milestones=[1, \"a\"]", "'train.step_milestones[1]'"),
        ("noequals", "KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=[override])


def test_bad_file_and_preset(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\niters = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config("tiny", bad)
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_config("huge")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_toml_round_trip(preset, tmp_path):
    cfg = load_config(preset, overrides=['data.train=a "quoted" dir'])
    text = to_toml(cfg)
    assert tomllib.loads(text) == cfg.to_dict()
    f = tmp_path / "c.toml"
    f.write_text(text)
    assert load_config("tiny", f) == cfg


def test_config_show_is_toml_that_loads_back_for_any_string():
    import dataclasses
    import tomllib

    from pipeline.config import load_config, to_toml

    cfg = load_config()
    for text in ("a\nb", 'quote " and \\ back', "tab\tcr\r", "del\x7fbell\x07", "ünïcødé ✓", "'single'"):
        odd = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=text))
        assert tomllib.loads(to_toml(odd))["data"]["train"] == text


def test_sizes_are_bounded_before_anything_is_allocated(capsys):
    from pipeline.cli import main
    from pipeline.config import MAX_SIDE, parse_size

    assert parse_size(f"{MAX_SIDE}x1") == (1, MAX_SIDE)
    for text in (f"{MAX_SIDE + 1}x10", f"10x{10**9}", "0x10", "10x-1"):
        with pytest.raises(UserError, match="from 1 to 8192"):
            parse_size(text)
    assert main(["-q", "budget", "--frame", "100000x100000"]) == 2
    assert "from 1 to 8192" in capsys.readouterr().err
