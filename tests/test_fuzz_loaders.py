"""The two loaders of user-given files, `pipeline quantize --calib FILE` (load_calibration) and `pipeline budget
--latency-table FILE` (load_table): known bad documents, each one clear UserError naming the file and the field; then
hypothesis mutating one field of a real document per example: the loader returns a document every later use can
take, or raises exactly one UserError naming the file, and writes nothing. Also: ONNX Runtime's quantizer leaves no
temporary beside the FP32 model it is given."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from models import create_model
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.convert import export, quantize
from pipeline.deploy import budget
from pipeline.deploy.probe import LATENCY_FORMAT, format_table, load_table
from pipeline.errors import UserError
from pipeline.machine import machine
from pipeline.rundir import versions

SCALE, COUNT, CROP = 2, 6, 8  # the calibration set: 6 crops of 8 px at x2, 2 of them held out


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return quantize.calibration_set("embedded-train", SCALE, COUNT, CROP, 2, seed=0)


def _save(folder: Path, data: dict[str, np.ndarray]) -> Path:
    path = folder / "calib.npz"
    with open(path, "wb") as f:
        np.savez(f, **data)
    return path


def _load_calib(path: Path) -> dict[str, np.ndarray]:
    return quantize.load_calibration(path, COUNT, CROP, SCALE)


# --- load_calibration: known bad sets -------------------------------------------------------------------------------

BAD_CALIB = {
    "scale a string": ("scale", lambda d: {**d, "scale": np.array("4")}),
    "scale NaN": ("scale", lambda d: {**d, "scale": np.array(np.nan)}),
    "scale a float": ("scale", lambda d: {**d, "scale": np.array(2.0)}),
    "scale 5": ("scale", lambda d: {**d, "scale": np.array(5)}),
    "scale 1-d": ("scale", lambda d: {**d, "scale": np.array([2])}),
    "scale a bool": ("scale", lambda d: {**d, "scale": np.array(True)}),
    "seed a float": ("seed", lambda d: {**d, "seed": np.array(0.5)}),
    "seed 1-d": ("seed", lambda d: {**d, "seed": np.array([0, 1])}),
    "seed negative": ("seed", lambda d: {**d, "seed": np.array(-1)}),
    "hr float32": ("hr", lambda d: {**d, "hr": d["hr"].astype(np.float32)}),
    "hr int64": ("hr", lambda d: {**d, "hr": d["hr"].astype(np.int64)}),
    "hr at another scale": ("hr", lambda d: {**d, "hr": d["hr"][:, ::2, ::2]}),
    "hr one crop short": ("hr", lambda d: {**d, "hr": d["hr"][1:]}),
    "lr 3-d": ("lr", lambda d: {**d, "lr": d["lr"][..., 0]}),
    "lr one channel": ("lr", lambda d: {**d, "lr": d["lr"][..., :1]}),
    "lr float": ("lr", lambda d: {**d, "lr": d["lr"].astype(np.float64)}),
    "zero crops": ("lr", lambda d: {**d, "lr": d["lr"][:0], "hr": d["hr"][:0], "holdout": d["holdout"][:0]}),
    "empty crops": ("lr", lambda d: {**d, "lr": d["lr"][:, :0, :0], "hr": d["hr"][:, :0, :0]}),
    "holdout int": ("holdout", lambda d: {**d, "holdout": d["holdout"].astype(np.int64)}),
    "holdout short": ("holdout", lambda d: {**d, "holdout": d["holdout"][1:]}),
    "holdout an object array": ("holdout", lambda d: {**d, "holdout": np.array([True, None], dtype=object)}),
    "an extra array": ("unknown arrays extra", lambda d: {**d, "extra": np.zeros(2)}),
    "no seed": ("missing arrays seed", lambda d: {k: v for k, v in d.items() if k != "seed"}),
}


@pytest.mark.parametrize("case", BAD_CALIB)
def test_a_bad_calibration_set_is_one_user_error_naming_the_file_and_the_field(calib, tmp_path, case):
    field, mutate = BAD_CALIB[case]
    path = _save(tmp_path, mutate(calib))
    with pytest.raises(UserError) as e:
        _load_calib(path)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)


def test_a_npy_file_named_npz_is_refused(calib, tmp_path):
    path = tmp_path / "calib.npz"
    with open(path, "wb") as f:
        np.save(f, calib["lr"])
    with pytest.raises(UserError, match=r"one uint8 \(6, 8, 8, 3\) array \(a \.npy file\?\)") as e:
        _load_calib(path)
    assert str(path) in str(e.value)


def _central_entry(raw: bytes, offset: int, value: bytes) -> bytes:
    """The zip `raw` with `value` at `offset` in its first central directory entry (lr.npy's)."""
    at = raw.index(b"PK\x01\x02") + offset
    return raw[:at] + value + raw[at + len(value):]


@pytest.mark.parametrize(("corrupt", "field", "named"), [
    (lambda raw: _central_entry(raw, 8, b"\x01\x00"), "lr", "encrypted"),  # general purpose flag bit 0
    (lambda raw: _central_entry(raw, 10, b"\x63\x00"), "lr", "compression method"),  # method 99
    # hr.npy's header dict never closes (hr, not lr: zipfile reads lr.npy whole, its CRC fails first)
    (lambda raw: raw.replace(b"16, 3), }", b"16, 3),  ", 1), "hr", "TokenError"),
])
def test_corrupt_bytes_numpy_and_zipfile_cannot_read_are_refused(calib, tmp_path, corrupt, field, named):
    path = _save(tmp_path, calib)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(UserError, match=named) as e:
        _load_calib(path)
    assert str(path) in str(e.value) and f"its {field} cannot be read" in str(e.value)


def test_a_good_calibration_set_loads_as_saved(calib, tmp_path):
    got = _load_calib(_save(tmp_path, calib))
    assert sorted(got) == sorted(calib) and all(np.array_equal(got[k], calib[k]) for k in calib)


# --- load_calibration: fuzzed ---------------------------------------------------------------------------------------

ODD_DTYPES = [np.uint8, np.int8, np.int16, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_,
              np.complex64, np.dtype("U3"), np.dtype("S2")]
ODD_ARRAYS = st.one_of(
    npst.arrays(st.sampled_from(ODD_DTYPES), npst.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3)),
    st.sampled_from([np.array(np.nan), np.array(np.inf), np.array(-1), np.array(2 ** 63 - 1), np.array(2 ** 64 - 1),
                     np.array("x"), np.array(b""), np.array(4.0), np.array([2]), np.array(True), np.zeros((0,)),
                     np.array([1, "a"], dtype=object), np.array(3), np.array(4, dtype=np.uint8)]))
TRANSFORMS = {
    "to float32": lambda a: a.astype(np.float32), "to int64": lambda a: a.astype(np.int64),
    "to bool": lambda a: a.astype(bool), "to str": lambda a: a.astype(str), "to uint8": lambda a: a.astype(np.uint8),
    "one more axis": lambda a: a[None], "flattened": lambda a: a.reshape(-1), "first dropped": lambda a: a[1:],
    "emptied": lambda a: a[:0], "doubled": lambda a: np.concatenate([a, a]), "plus one": lambda a: a + 1,
    "every other row": lambda a: a[:, ::2], "last axis cut": lambda a: a[..., :1], "transposed": lambda a: a.T,
}


@st.composite
def calib_mutations(draw):
    """(what, key, how): one change to one array of the set, or to the file (cut short, or one byte flipped)."""
    what = draw(st.sampled_from(["replace", "transform", "drop", "extra", "npy", "truncate", "flip"]))
    key = draw(st.sampled_from(quantize.CALIB_KEYS))
    if what == "replace":
        return what, key, draw(ODD_ARRAYS)
    if what == "transform":
        return what, key, draw(st.sampled_from(sorted(TRANSFORMS)))
    if what in ("truncate", "flip"):
        return what, key, draw(st.floats(0, 0.999))
    return what, key, None


def _mutated_calib(folder: Path, calib: dict[str, np.ndarray], mutation: tuple) -> Path:
    what, key, how = mutation
    data = dict(calib)
    if what == "replace":
        data[key] = how
    elif what == "transform":
        try:
            data[key] = TRANSFORMS[how](np.atleast_1d(calib[key]))
        except (IndexError, ValueError):  # a transform a 1-d array does not have
            data[key] = np.atleast_1d(calib[key])[None]
    elif what == "drop":
        del data[key]
    elif what == "extra":
        data[f"{key}2"] = calib[key]
    path = _save(folder, data)
    if what == "npy":
        with open(path, "wb") as f:
            np.save(f, calib[key])
    elif what == "truncate":
        path.write_bytes(path.read_bytes()[:int(how * path.stat().st_size)])
    elif what == "flip":
        raw = bytearray(path.read_bytes())
        raw[int(how * len(raw))] ^= 0xFF
        path.write_bytes(bytes(raw))
    return path


@settings(max_examples=50, deadline=None)
@given(mutation=calib_mutations())
def test_a_mutated_calibration_set_loads_or_is_one_user_error(calib, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        path = _mutated_calib(Path(tmp), calib, mutation)
        before = sorted(os.listdir(tmp))
        try:
            got = _load_calib(path)
        except UserError as e:
            assert str(path) in str(e), str(e)
        else:  # what it returns is what the quantizer takes
            n = len(got["lr"])
            assert got["lr"].dtype == got["hr"].dtype == np.uint8 and got["lr"].shape[1:] == (CROP, CROP, 3)
            assert got["hr"].shape == (n, CROP * SCALE, CROP * SCALE, 3) and n >= COUNT
            assert got["holdout"].dtype == bool and got["holdout"].shape == (n,) and int(got["scale"]) == SCALE
        assert sorted(os.listdir(tmp)) == before


# --- the CPU twin's quantizer leaves nothing beside its input -------------------------------------------------------

def test_the_cpu_quantizer_leaves_no_temporary_beside_the_fp32_model(calib, tmp_path, monkeypatch):
    model = create_model("tiny_student", scale=SCALE)
    run = tmp_path / "run"
    run.mkdir()
    fp32 = run / "student.fp32.onnx"
    export.export_fp32(model, fp32, export.model_meta(model, "a", "b"))
    before = sorted(os.listdir(run))
    lr = calib["lr"][~calib["holdout"]]
    with tempfile.TemporaryDirectory() as work:
        twin = quantize.cpu_twin_quantizer(fp32, lr, "minmax", 99.99, Path(work))
        names = [n.name for n in export.conv_nodes(onnx.load(str(fp32)))]
        real = onnx.shape_inference.infer_shapes_path

        def full_disk(src: str, dst: str, *args, **kwargs) -> None:  # the shape-inferred copy is written, then ENOSPC
            real(src, dst, *args, **kwargs)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", full_disk)
        with pytest.raises(OSError, match="No space"):
            twin(set(names))
    assert sorted(os.listdir(run)) == before


def test_quantizing_a_run_shape_infers_nothing_in_the_run_folder(calib, tmp_path, monkeypatch):
    """Both INT8 models of a run: ONNX Runtime's calibrators (TensorRT model) and quantizer (CPU model) write their
    `-inferred.onnx` into a temporary folder, never beside the run's FP32 model."""
    model = create_model("tiny_student", scale=SCALE)
    fp32, fp16 = tmp_path / "student.fp32.onnx", tmp_path / "student.fp16.onnx"
    export.export_fp32(model, fp32, export.model_meta(model, "a", "b"))
    export.save(export.to_fp16(onnx.load(str(fp32))), fp16)
    written = []
    real = onnx.shape_inference.infer_shapes_path

    def spy(src: str, dst: str, *args, **kwargs) -> None:
        written.append(Path(dst).parent)
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", spy)
    quantize.int8_models(load_config(overrides=[f"scale={SCALE}"]), fp32, fp16, calib, progress=False)
    assert written and tmp_path not in written


# --- load_table: known bad tables -----------------------------------------------------------------------------------

def _row(name: str, blocks: int, channels: int, params: int, p95: float) -> dict:
    return {"name": name, "preset": "tiny_student", "blocks": blocks, "channels": channels, "params": params,
            "flops": params * 1000, "model": "onnxruntime-cpu-int8-cpu", "p50_ms": p95 * 0.9, "p95_ms": p95}


# What `time_probe` writes (every key, this machine's `machine()` and `versions()`), for two candidates.
TABLE = {"format": LATENCY_FORMAT, "created": "2025-01-01T00:00:00+0000", "scale": 4, "frame": "1280x720",
         "lr_size": "320x180", "backend": "onnxruntime", "runner": "onnxruntime-cpu", "precision": "int8",
         "machine": machine(), "versions": versions(), "weights": budget.RANDOM_WEIGHTS, "recipe": "pipeline export",
         "tiling": budget.upscale_tiling(), "timing": "runner.infer on one uint8 320x180 LR frame",
         "candidates": [_row("b1c8", 1, 8, 6867, 30.0), _row("b4c16", 4, 16, 35000, 80.0)]}
ASKED = (4, "1280x720", "onnxruntime", "int8")


def _with(path: str, value: object) -> dict:
    """TABLE with the field at `path` ('machine.cpu', 'candidates.0.blocks') set to `value` (... = removed)."""
    table = copy.deepcopy(TABLE)
    *parents, leaf = path.split(".")
    node = table
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(leaf) if isinstance(node, list) else leaf
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return table


BAD_TABLES = {
    "machine {}": ("machine", _with("machine", {})),
    "machine a string": ("machine", _with("machine", "x")),
    "machine without cores": ("machine.cores", _with("machine.cores", ...)),
    "machine cores a string": ("machine.cores", _with("machine.cores", "2")),
    "machine flags a string": ("machine.cpu_flags", _with("machine.cpu_flags", "avx2")),
    "no runner": ("runner", _with("runner", ...)),
    "runner of another backend": ("runner", _with("runner", "tensorrt")),
    "no lr_size": ("lr_size", _with("lr_size", ...)),
    "lr_size a number": ("lr_size", _with("lr_size", 320)),
    "scale a string": ("scale", _with("scale", "4")),
    "scale a float": ("scale", _with("scale", 4.0)),
    "frame a list": ("frame", _with("frame", [1280, 720])),
    "backend unknown": ("backend", _with("backend", "cuda")),
    "precision unknown": ("precision", _with("precision", "int4")),
    "blocks 0": ("blocks", _with("candidates.0.blocks", 0)),
    "blocks a float": ("blocks", _with("candidates.0.blocks", 2.5)),
    "channels a string": ("channels", _with("candidates.1.channels", "16")),
    "params huge": ("params", _with("candidates.0.params", 10 ** 400)),
    "flops a bool": ("flops", _with("candidates.0.flops", True)),
    "p95 NaN": ("p95_ms", _with("candidates.0.p95_ms", float("nan"))),
    "p50 negative": ("p50_ms", _with("candidates.0.p50_ms", -1.0)),
    "name empty": ("name", _with("candidates.0.name", "")),
    "name a number": ("name", _with("candidates.0.name", 5)),
    "preset unknown": ("preset", _with("candidates.0.preset", "edsr_studnet")),
    "preset a list": ("preset", _with("candidates.0.preset", ["tiny_student"])),
    "no candidates": ("candidates", _with("candidates", [])),
    "a candidate not an object": ("candidate 1", _with("candidates.1", "b4c16")),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_a_bad_latency_table_is_one_clear_error_naming_the_file_and_the_field(tmp_path, capsys, case):
    field, table = BAD_TABLES[case]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    out = tmp_path / "out"
    assert main(["budget", "--latency-table", str(path), "--budget-ms", "100", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(path) in err and field in err, err
    assert not out.exists()


@pytest.mark.parametrize(("text", "named"), [("1" * 5000, "digits"), ("[" * 100_000, "RecursionError"),
                                             (b"\xff\xfe", "UnicodeDecodeError")])
def test_json_python_cannot_read_is_not_valid_json(tmp_path, text, named):
    path = tmp_path / "latency.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=named) as e:
        load_table(path, *ASKED)
    assert str(path) in str(e.value) and "not valid JSON" in str(e.value)


def test_a_table_at_the_edges_is_taken_by_every_later_use(tmp_path):
    """No preset (an older table), unknown cores, zero params / FLOPs / latency (on log axes): loaded, chosen,
    printed and plotted."""
    table = _with("machine.cores", None)
    del table["candidates"][0]["preset"]
    table["candidates"][0].update(params=0, flops=0, p50_ms=0, p95_ms=0)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    got = load_table(path, *ASKED)
    choice = budget.choose(got, 100, 0.1, ["tiny_student"])
    assert choice["name"] == "b4c16" and "None cores" in format_table(got, choice)
    (tmp_path / "out").mkdir()
    budget.write_budget(tmp_path / "out", got, 100, 0.1, choice)
    assert (tmp_path / "out" / "budget.png").stat().st_size > 0


# --- load_table: fuzzed ---------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 30, 10 ** 30) | st.floats()
    | st.sampled_from([10 ** 400, 2 ** 63, -1, 0, 1e308, "", "int8", "fp16", "tensorrt", "openvino", "onnxruntime",
                       "onnxruntime-cuda", "4", "1280x720", "tiny_student", "$\\frac$", [], {}])
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
FIELDS = [list(TABLE), [f"machine.{k}" for k in TABLE["machine"]],  # each part of the table equally often
          [f"candidates.{i}" for i in range(len(TABLE["candidates"]))] + [f"candidates.{i}.{k}" for i, row in
                                                                        enumerate(TABLE["candidates"]) for k in row]]


@st.composite
def table_mutations(draw):
    """(field, value): one field of TABLE replaced (..., removed), or a new field beside it."""
    field = draw(st.sampled_from(draw(st.sampled_from(FIELDS))))
    if draw(st.booleans()):  # a new field beside it
        parent = field.rpartition(".")[0]
        field = "extra" if parent in ("", "candidates") else f"{parent}.extra"
    return field, draw(st.just(...) | JSON_VALUES)


@settings(max_examples=50, deadline=None)
@given(mutation=table_mutations())
def test_a_mutated_latency_table_loads_for_every_later_use_or_is_one_user_error(mutation):
    field, value = mutation
    try:
        table = _with(field, value)
    except (KeyError, IndexError):  # removing a field that is not there: the table as it is
        table = copy.deepcopy(TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latency.json"
        path.write_text(json.dumps(table))
        before = sorted(os.listdir(tmp))
        try:
            got = load_table(path, *ASKED)
        except UserError as e:
            assert str(path) in str(e), str(e)
        else:  # what `pipeline budget` does with it next: choose (or say none fits) and print
            try:
                choice = budget.choose(got, 1e6, 0.1, ["tiny_student"])
            except UserError:
                choice = None
            format_table(got, choice)
        assert sorted(os.listdir(tmp)) == before
