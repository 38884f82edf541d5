"""Static guard: no code under pipeline/, models/ or kernels/ uses a TensorRT API we avoid: the weak typing flags and
implicit INT8 calibration (deprecated in 10.x, removed in TensorRT 11), execute_async_v2 and the binding-index APIs
(absent from TensorRT 10.x and 11.x), execute_v2 (still bound in 11.x; synchronous, so not for the runner's stream) and
device_memory_size (deprecated in 10.x). Comments and strings are skipped (tokenize), so docstrings may name them.
The attributes the code does use are checked against TensorRT's type stubs by `.ci/typecheck-trt`."""

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "models", "kernels")
AVOIDED = {
    "BuilderFlag.FP16 / BuilderFlag.INT8 (weak typing, removed in TensorRT 11; use a strongly typed network and "
    "typed ONNX)": r"\bBuilderFlag\s*\.\s*(FP16|INT8)\b",
    "int8_calibrator (implicit INT8 calibration, removed in TensorRT 11; use explicit QDQ)": r"\bint8_calibrator\b",
    "IInt8*Calibrator classes (implicit INT8 calibration, removed in TensorRT 11; use explicit QDQ)": r"\bIInt8\w*",
    "execute_async_v2 (absent from TensorRT 10.x and 11.x; use set_tensor_address + execute_async_v3)":
        r"\bexecute_async_v2\b",
    "execute_v2 (synchronous; use execute_async_v3 on the runner's stream)": r"\bexecute_v2\b",
    "binding-index APIs (absent from TensorRT 10.x and 11.x; use num_io_tensors / get_tensor_name / get_tensor_mode)":
        r"\b(get_binding_\w+|set_binding_\w+|binding_is_input|num_bindings)\b",
    "device_memory_size (deprecated in TensorRT 10.x; use device_memory_size_v2)": r"\bdevice_memory_size\b",
}


def code_lines(text: str) -> dict[int, str]:
    """Line number -> the line's code tokens joined by spaces (comments and strings left out)."""
    lines: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
            lines.setdefault(tok.start[0], []).append(tok.string)
    return {n: " ".join(parts) for n, parts in lines.items()}


def violations(text: str) -> list[tuple[int, str]]:
    return [(n, what) for n, code in code_lines(text).items() for what, pattern in AVOIDED.items()
            if re.search(pattern, code)]


def test_scanner_catches_removed_apis():
    bad = [
        "config.set_flag(trt.BuilderFlag.FP16)",
        "config.set_flag(trt.BuilderFlag .INT8)",
        "config.int8_calibrator = calib",
        "class Calib(trt.IInt8EntropyCalibrator2): pass",
        "context.execute_async_v2(bindings, stream)",
        "context.execute_v2(bindings)",
        "i = engine.get_binding_index('lr')",
        "s = engine.get_binding_shape(0)",
        "ok = engine.binding_is_input(0)",
        "n = engine.num_bindings",
        "context.set_binding_shape(0, shape)",
        "size = engine.device_memory_size",
    ]
    for line in bad:
        assert violations(line + "\n"), line


def test_scanner_passes_current_apis_comments_and_strings():
    good = (
        "context.execute_async_v3(stream)\n"
        "n = engine.num_io_tensors\n"
        "size = engine.device_memory_size_v2\n"
        "config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)\n"
        "# BuilderFlag.FP16 (removed in TensorRT 11) and execute_async_v2 (absent from 10.x)\n"
        "msg = 'no int8_calibrator, no get_binding_index'\n"
        'doc = """IInt8EntropyCalibrator2 is gone"""\n'
    )
    assert violations(good) == []


def test_this_guard_is_not_scanned_itself():
    assert Path(__file__).resolve().parent.name == "tests"
    assert all(ROOT / d not in Path(__file__).resolve().parents for d in SCANNED)


@pytest.mark.parametrize("folder", SCANNED)
def test_no_avoided_tensorrt_api(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"nothing to scan under {folder}/"
    found = [f"{path.relative_to(ROOT)}:{n}: {what}" for path in files
             for n, what in violations(path.read_text(encoding="utf-8"))]
    assert not found, "TensorRT APIs this project avoids:\n" + "\n".join(found)
