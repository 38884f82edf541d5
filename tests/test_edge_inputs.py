"""The edge runtime on hand-edited bundles (pipeline/deploy/edge.py): a malformed `bundle.json` or `golden/golden.json`
(the listed sha256 updated, so only the field is wrong) is exit 2 with one line `error: <file>: <field> ...`, never a
traceback; it runs and hashes only the files `bundle.json` lists, none through a symbolic link; an unexpected exception
is exit 70 with the traceback in a file. Then a fuzz of both documents (hypothesis) through `main` in-process."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.backends.openvino_runner
import pipeline.backends.ort_runner
from pipeline.backends.base import Runner
from pipeline.config import load_config
from pipeline.data.imageio import read_rgb
from pipeline.deploy import edge
from pipeline.deploy.bundle import make_bundle
from pipeline.rundir import sha256_file

FAST = ['verify.latency_sizes=["40x24"]', "verify.repeats=2", "verify.warmup=0"]  # as tests/test_bundle.py


@pytest.fixture(scope="module")
def pristine(exported_run, tmp_path_factory) -> Path:
    """A bundle of the exported run; tests copy it."""
    out = tmp_path_factory.mktemp("edge_inputs") / "deploy"
    make_bundle(load_config(overrides=FAST), exported_run, out, progress=False)
    return out


def _copy(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


def _doc(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _write(folder: Path, name: str, text: str) -> None:
    """Write `name` and update its sha256 in bundle.json where listed."""
    (folder / name).write_text(text)
    if name != edge.BUNDLE_JSON:
        _rehash(folder, name)


def _rehash(folder: Path, *names: str) -> None:
    info = _doc(folder, edge.BUNDLE_JSON)
    if isinstance(info, dict) and isinstance(info.get("files"), dict):
        info["files"].update((n, sha256_file(folder / n)) for n in names if n in info["files"])
        (folder / edge.BUNDLE_JSON).write_text(json.dumps(info))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def _verify(folder: Path, *extra: str) -> tuple[int, str]:
    """`python -m pipeline.edge verify` in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = edge.main(["verify", "--bundle", str(folder), "-q", *extra])
    return rc, err.getvalue()


def _assert_one_error(rc: int, err: str, prefix: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {prefix}"), (rc, err)


def _pop(key: str):
    return lambda d: d.pop(key)


def _set(key: str, value: object):
    return lambda d: d.__setitem__(key, value)


def _gate(precision: str, value: object):
    return lambda d: d["gates"].__setitem__(precision, value)


BAD_BUNDLE_JSON = [
    ("gates.int8", lambda d: d["gates"].pop("int8")),
    ("gates", _set("gates", [0.01, 0.05, 0.2])),
    ("scale", _set("scale", "four")),
    ("scale", _set("scale", 5)),
    ("scale", _set("scale", True)),
    ("warmup", _set("warmup", "x")),
    ("warmup", _set("warmup", -1)),
    ("repeats", _set("repeats", 0)),
    ("repeats", _set("repeats", 10**30)),
    ("gates.fp16", _gate("fp16", "nan")),
    ("gates.fp16", _gate("fp16", math.nan)),
    ("gates.fp16", _gate("fp16", math.inf)),
    ("gates.fp16", _gate("fp16", -1.0)),
    ("gates.fp32", _gate("fp32", 10**400)),
    ("latency_sizes", _set("latency_sizes", "40x24")),
    ("latency_sizes[0]", _set("latency_sizes", ["40x"])),
    ("latency_sizes[0]", _set("latency_sizes", [[40, 24]])),
    ("latency_sizes[1]", _set("latency_sizes", ["40x24", "0x24"])),
    ("latency_sizes[0]", _set("latency_sizes", ["100000x24"])),
    ("engine.tile", lambda d: d["engine"].__setitem__("tile", "x")),
    ("engine.profile", lambda d: d["engine"].__setitem__("profile", "4k")),
    ("engine.colour", lambda d: d["engine"].__setitem__("colour", 1)),
    ("engine", _set("engine", None)),
    ("files", _set("files", ["student.fp32.onnx"])),
    ("format", _set("format", "facd-pipeline-bundle/0")),
]


def _image(key: str, value: object):
    return lambda d: d["images"][0].__setitem__(key, value)


BAD_GOLDEN_JSON = [
    ("images", _pop("images")),
    ("images", _set("images", [])),
    ("images", _set("images", "lr/lxqt-after-the-rain.png")),
    ("images[0]", _set("images", [None])),
    *[(f"images[0].{k}", lambda d, k=k: d["images"][0].pop(k)) for k in ("name", "lr", "sr_fp32", "hr", "psnr_y")],
    ("images[0].psnr_y", _image("psnr_y", "31.2")),
    ("images[0].psnr_y", _image("psnr_y", math.nan)),
    ("images[0].psnr_y", _image("psnr_y", -math.inf)),
    ("images[0].lr", _image("lr", "../manifest.json")),
    ("images[0].lr", _image("lr", 3)),
    ("images[0].name", _image("name", "")),
    ("images[0]", _image("hr", "lr/lxqt-after-the-rain.png")),  # an HR of the LR's size
    ("images[0]", _image("lr", "hr/lxqt-after-the-rain.png")),
]


BAD_FIELDS = ([(edge.BUNDLE_JSON, *case) for case in BAD_BUNDLE_JSON]
              + [(edge.GOLDEN_JSON, *case) for case in BAD_GOLDEN_JSON])


@pytest.mark.parametrize("document, field, change", BAD_FIELDS,
                         ids=[f"{Path(d).stem}-{f}-{i}" for i, (d, f, _) in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_one_error_line_naming_the_file_and_field(document, field, change, pristine, tmp_path):
    folder = _copy(pristine, tmp_path / "deploy")
    doc = _doc(folder, document)
    change(doc)
    _write(folder, document, json.dumps(doc))  # golden.json's sha256 updated in bundle.json: only the field is wrong
    before = _listing(folder)
    _assert_one_error(*_verify(folder), f"{folder / document}: {field}")
    assert _listing(folder) == before


@pytest.mark.parametrize("text", ["{not json", "[]", "null", '"images"', "\xff"])
def test_a_golden_json_that_is_not_a_table_of_images_is_one_error_line(text, pristine, tmp_path):
    folder = _copy(pristine, tmp_path / "deploy")
    _write(folder, edge.GOLDEN_JSON, text)
    _assert_one_error(*_verify(folder), f"{folder / edge.GOLDEN_JSON}: ")


def test_a_scale_that_is_not_the_golden_images_is_one_error_line(pristine, tmp_path):
    folder = _copy(pristine, tmp_path / "deploy")
    info = _doc(folder, edge.BUNDLE_JSON)
    info["scale"] = 2
    _write(folder, edge.BUNDLE_JSON, json.dumps(info))
    rc, err = _verify(folder)
    _assert_one_error(rc, err, f"{folder / edge.BUNDLE_JSON}: scale: 2, but the golden images are x4")


def test_a_symbolic_link_inside_the_bundle_is_refused(pristine, tmp_path):
    folder = _copy(pristine, tmp_path / "dir")
    shutil.rmtree(folder / "golden" / "hr")
    (folder / "golden" / "hr").symlink_to("lr")  # hr/lxqt-after-the-rain.png is now lr/lxqt-after-the-rain.png
    _rehash(folder, *[n for n in _doc(folder, edge.BUNDLE_JSON)["files"] if n.startswith("golden/hr/")])
    rc, err = _verify(folder)
    _assert_one_error(rc, err, f"{folder / edge.BUNDLE_JSON}: files: ")
    assert "golden/hr/lxqt-after-the-rain.png" in err and "symbolic link" in err

    folder = _copy(pristine, tmp_path / "file")
    (folder / "golden" / "hr" / "lxqt-butterfly.png").unlink()
    (folder / "golden" / "hr" / "lxqt-butterfly.png").symlink_to("../lr/lxqt-butterfly.png")
    _rehash(folder, "golden/hr/lxqt-butterfly.png")
    rc, err = _verify(folder)
    _assert_one_error(rc, err, f"{folder / edge.BUNDLE_JSON}: files: ")
    assert "golden/hr/lxqt-butterfly.png" in err and "lxqt-after-the-rain" not in err


def test_a_model_a_row_runs_must_be_listed_and_hashed(pristine, tmp_path):
    """The FP32 entry removed from `files` and the INT8 model copied over it: refused, not run as the FP32 row."""
    folder = _copy(pristine, tmp_path / "deploy")
    info = _doc(folder, edge.BUNDLE_JSON)
    del info["files"]["student.fp32.onnx"]
    (folder / edge.BUNDLE_JSON).write_text(json.dumps(info))
    shutil.copyfile(folder / "student.int8.onnx", folder / "student.fp32.onnx")
    rc, err = _verify(folder)
    _assert_one_error(rc, err, f"{folder / edge.BUNDLE_JSON}: files: ")
    assert "student.fp32.onnx" in err and not (folder / edge.REPORT_JSON).exists()


def test_golden_json_must_be_listed_and_hashed(pristine, tmp_path):
    folder = _copy(pristine, tmp_path / "deploy")
    info = _doc(folder, edge.BUNDLE_JSON)
    del info["files"][edge.GOLDEN_JSON]
    (folder / edge.BUNDLE_JSON).write_text(json.dumps(info))
    rc, err = _verify(folder)
    _assert_one_error(rc, err, f"{folder / edge.BUNDLE_JSON}: files: ")
    assert edge.GOLDEN_JSON in err


def test_the_loaders_return_checked_typed_values(pristine):
    bundle = edge.load_bundle(pristine)
    assert (bundle.scale, bundle.gates, bundle.latency_sizes, bundle.warmup, bundle.repeats) == (
        4, {"fp32": 0.01, "fp16": 0.05, "int8": 0.2}, ["40x24"], 0, 2)
    assert bundle.engine.timing_cache == str(pristine / "plans" / "trt-timing.cache")
    assert bundle.files == _doc(pristine, edge.BUNDLE_JSON)["files"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.scale = 2
    golden = edge.load_golden(pristine, bundle)
    assert [g.name for g in golden] == ["lxqt-after-the-rain", "lxqt-appleflower", "lxqt-butterfly", "lxqt-drop"]
    assert all(g.hr.shape == g.sr.shape == (g.lr.shape[0] * 4, g.lr.shape[1] * 4, 3) for g in golden)


def test_an_unexpected_exception_is_exit_70_with_the_traceback_in_a_file(pristine, tmp_path, monkeypatch):
    folder = _copy(pristine, tmp_path / "deploy")

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(edge, "choose_backend", boom)
    rc, err = _verify(folder)
    match = re.fullmatch(r"internal error: RuntimeError: boom.*; please report it \(traceback in (.+)\)\n", err)
    assert rc == 70 and match, err
    log = Path(match[1])
    assert log.parent == folder and "Traceback" in log.read_text() and "in boom" in log.read_text()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no bundle folder to write into: the temp folder
    monkeypatch.setattr(edge, "load_bundle", boom)
    rc, err = _verify(tmp_path / "nowhere")
    match = re.fullmatch(r"internal error: .*\(traceback in (.+)\)\n", err)
    assert rc == 70 and match and Path(match[1]).parent == tmp_path and "boom" in Path(match[1]).read_text()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edge, "load_bundle", interrupt)
    assert _verify(folder)[0] == 130


# --- fuzz: one field of the real document changed -------------------------------------------------------------------

class Replay(Runner):
    """Plays any model fast: the PyTorch output recorded for a golden LR image (else a nearest-neighbour x4)."""

    outputs: ClassVar[dict[bytes, np.ndarray]] = {}

    def __init__(self, model, *args):
        super().__init__(4)
        self.name = f"replay of {Path(model).name}"

    def infer(self, lr: np.ndarray) -> np.ndarray:
        return self.outputs.get(lr.tobytes(), lr.repeat(4, 0).repeat(4, 1))


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, 4, -1, 10**30, 1e308, "", "nan", "four", "40x24", "0x24", "lr/lxqt-butterfly.png",
                     "student.int8.onnx", [], {}]),
    st.text(max_size=8), st.lists(st.one_of(st.integers(-9, 99), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(doc: object, prefix: tuple = (), depth: int = 3) -> list[tuple]:
    """Every key path into `doc` to `depth` (of `files`: the models, the golden set and one runtime file)."""
    out = [prefix]
    if depth and isinstance(doc, (dict, list)):
        items = doc.items() if isinstance(doc, dict) else enumerate(doc)
        for k, v in items:
            if prefix == ("files",) and k.startswith("runtime/") and k != "runtime/pipeline/edge.py":
                continue
            out += _paths(v, (*prefix, k), depth - 1)
    return out


def _mutate(doc: object, path: tuple, op: str, value: object) -> object:
    """`doc` with the value at `path` set to `value`, deleted, or with an extra key (or item) beside it."""
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if op == "set":
        parent[path[-1]] = value
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["fuzz extra"] = value
    else:
        parent.append(value)
    return doc


@pytest.fixture(scope="module")
def documents(pristine) -> dict[str, tuple[object, list[tuple]]]:
    """The real documents and the key paths into them; the recorded outputs for Replay."""
    Replay.outputs = {read_rgb(pristine / "golden" / g["lr"]).tobytes(): read_rgb(pristine / "golden" / g["sr_fp32"])
                      for g in _doc(pristine, edge.GOLDEN_JSON)["images"]}
    docs = {name: _doc(pristine, name) for name in (edge.BUNDLE_JSON, edge.GOLDEN_JSON)}
    return {name: (doc, _paths(doc)) for name, doc in docs.items()}


def _fuzz(pristine: Path, name: str, doc: object, raw: str | None = None) -> None:
    """Verify a copy of the bundle with `name` replaced by `doc` (or the text `raw`), the latency and the models
    played fast; the loaders and the rest are the real ones."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        folder = _copy(pristine, Path(tmp) / "deploy")
        _write(folder, name, raw if raw is not None else json.dumps(doc))
        before = _listing(folder)
        mp.setattr(edge, "latency", lambda runner, size, warmup, repeats: {"lr_size": size, "p50_ms": 1.0,
                                                                           "p95_ms": 1.0, "images_per_s": 1e3})
        for module, runner in ((pipeline.backends.ort_runner, "OrtRunner"),
                               (pipeline.backends.openvino_runner, "OpenVinoRunner")):
            mp.setattr(module, runner, Replay)
        rc, err = _verify(folder)
        assert "Traceback" not in err and rc in (0, 1, 2), (rc, err)
        if rc == 2:
            assert err.count("\n") == 1 and err.startswith("error: "), err
            assert _listing(folder) == before
        else:
            after = _listing(folder)
            assert after.pop(edge.REPORT_JSON) and after == before


def _draw_and_fuzz(pristine: Path, documents: dict, name: str, data: st.DataObject) -> None:
    """One field of the real `name` set to a drawn value, deleted or given an extra key beside it; or the document
    cut short."""
    doc, paths = documents[name]
    path = data.draw(st.sampled_from(paths), label="path")
    op = data.draw(st.sampled_from(["set", "delete", "extra", "cut"]) if path else st.just("set"), label="op")
    if op == "cut":
        text = json.dumps(doc)
        _fuzz(pristine, name, None, text[:data.draw(st.integers(0, len(text) - 1), label="length")])
    else:
        _fuzz(pristine, name, _mutate(copy.deepcopy(doc), path, op, data.draw(VALUES, label="value")))


@settings(max_examples=50, deadline=None, database=None)
@given(data=st.data())
def test_fuzz_bundle_json(pristine, documents, data):
    _draw_and_fuzz(pristine, documents, edge.BUNDLE_JSON, data)


@settings(max_examples=50, deadline=None, database=None)
@given(data=st.data())
def test_fuzz_golden_json(pristine, documents, data):
    _draw_and_fuzz(pristine, documents, edge.GOLDEN_JSON, data)
