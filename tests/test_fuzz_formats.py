"""Fuzzing the loaders of the run manifest, checkpoint model configs, TOML config files and the study's grid and
seed lists (the calibration set and the latency table: tests/test_fuzz_loaders.py; bundles: test_edge_inputs.py).

Each example takes a real, valid document and breaks one field (a wrong type, a missing or extra key, NaN / inf,
a huge number, an empty container); the loader must either accept it or refuse it with its own error naming the file
or field, never with another exception, and never write anything."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import CheckpointError, create_model, model_from_checkpoint
from pipeline.config import load_config, to_toml
from pipeline.errors import UserError
from pipeline.rundir import RunDir, load_manifest
from pipeline.training.study import check_seeds, parse_grid

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

WRONG = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                  st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]), st.text(max_size=8),
                  st.just([]), st.just({}), st.lists(st.integers(), max_size=3), st.just({"x": [1, {"y": None}]}))


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON-like document, containers included."""
    yield prefix, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


@st.composite
def broken(draw, doc):
    """`doc` with one change: a value replaced, a key removed, or a key added, anywhere."""
    doc = copy.deepcopy(doc)
    path, _ = draw(st.sampled_from(list(_paths(doc))))
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if not path:
        return draw(WRONG) if action == "replace" else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        parent[path[-1]] = draw(WRONG)
    elif action == "remove":
        parent.pop(path[-1])
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6))] = draw(WRONG)
    else:
        parent.append(draw(WRONG))
    return doc


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SHA = "0" * 64
MANIFEST = {"stages": {"export": {"key": "k" * 64, "outputs": ["student.fp32.onnx", "export.json"]}},
            "artifacts": {"student.fp32.onnx": {"sha256": SHA, "size": 10, "stage": "export"},
                          "export.json": {"sha256": "a" * 64, "size": 3, "stage": "export"}}}


@SETTINGS
@given(data=st.data())
def test_manifest_loader_accepts_or_names_the_entry(tmp_path, data):
    doc = data.draw(broken(MANIFEST))
    run = Path(tempfile.mkdtemp(dir=tmp_path))
    (run / "manifest.json").write_text(json.dumps(doc))
    before = _listing(run)
    try:
        manifest = load_manifest(run / "manifest.json")
    except UserError as e:
        assert "manifest.json" in str(e)
    else:  # accepted: every later use works on it
        r = RunDir(run)
        for stage, entry in manifest["stages"].items():  # the outputs are not there
            assert r.is_current(stage, "k" * 64) is (entry["key"] == "k" * 64 and not entry["outputs"])
        for name in manifest["artifacts"]:
            assert r.recorded_sha256(name) is not None
    assert _listing(run) == before


CHECKPOINT_CONFIGS = [create_model(name, scale=4).config for name in ("tiny_student", "anchor_s")]


@SETTINGS
@pytest.mark.parametrize("index", range(len(CHECKPOINT_CONFIGS)))
@given(data=st.data())
def test_checkpoint_model_config_is_refused_before_anything_is_allocated(index, data):
    config = data.draw(broken(CHECKPOINT_CONFIGS[index]))
    ckpt = {"format": "facd-pipeline/1", "model": config, "state_dict": {}}
    try:
        model_from_checkpoint(ckpt, name="fuzzed.pt")
    except CheckpointError as e:  # a bad config, or (accepted) weights that do not match the empty state
        assert "fuzzed.pt" in str(e)


BASE_TOML = to_toml(load_config())


@SETTINGS
@given(data=st.data())
def test_toml_config_file_is_checked_at_load(tmp_path, data):
    import tomllib

    doc = data.draw(broken(tomllib.loads(BASE_TOML)))
    if not isinstance(doc, dict):
        doc = {"value": doc}
    path = tmp_path / "fuzzed.toml"
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items() if not isinstance(v, dict))
    for name, section in doc.items():
        if isinstance(section, dict):
            text += f"[{name}]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in section.items())
    path.write_text(text)
    before = _listing(tmp_path)
    try:
        load_config(file=path)
    except UserError as e:
        assert str(e)
    assert _listing(tmp_path) == before


@SETTINGS
@given(grid=st.lists(st.text(max_size=12), max_size=4), seeds=st.lists(st.integers(-3, 3), max_size=5))
def test_grid_and_seed_lists_are_parsed_or_refused(grid, seeds):
    try:
        axes = parse_grid(grid)
    except UserError as e:
        assert "--grid" in str(e)
    else:
        assert all(values and len(set(values)) == len(values) for values in axes.values())
    try:
        assert check_seeds(seeds) == seeds and len(set(seeds)) == len(seeds) and min(seeds, default=0) >= 0
    except UserError as e:
        assert "--seeds" in str(e)
