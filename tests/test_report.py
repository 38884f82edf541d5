import numpy as np
from PIL import Image

from pipeline.evaluation.report import format_rows, write_report

NAMES = ["report.md", "psnr.png", "latency.png", "crops.png"]


def _row(backend, precision, status, psnr, reason="", vs_ref=50.0, throughput=True):
    skipped = status == "skipped"
    p50 = {"pytorch": 120.0, "onnxruntime-cpu": 80.0, "tensorrt": 2.0}.get(backend, 10.0)
    return {
        "backend": backend, "precision": precision, "model": "student.pt" if backend == "pytorch" else "student.onnx",
        "status": status, "reason": reason,
        "psnr_y": None if skipped else psnr, "ssim_y": None if skipped else 0.78912,
        "delta_db": None if skipped else psnr - 28.04, "psnr_vs_reference": None if skipped else vs_ref,
        "gate_db": {"fp32": 0.01, "fp16": 0.05, "int8": 0.2}[precision],
        "latency_ms_p50": None if skipped else p50, "latency_ms_p95": None if skipped else p50 * 1.1,
        "throughput": [] if skipped or not throughput else [
            {"lr_size": s, "p50_ms": p50 * k, "p95_ms": p50 * k * 1.1, "images_per_s": 1000 / (p50 * k),
             "peak_mem_mb": None if backend == "pytorch" else 310.0}
            for s, k in (("320x180", 1.0), ("480x270", 2.2))
        ],
    }


def _report(rows, passed=False):
    return {
        "scale": 4, "data": "embedded", "created": "2026-11-26T02:00:00+0000",
        "machine": {"cpu": "Intel(R) Xeon(R) Processor", "gpu": None},
        "gates": {"fp32": 0.01, "fp16": 0.05, "int8": 0.2},
        "bicubic": {"psnr_y": 27.81, "ssim_y": 0.77},
        "passed": passed, "rows": rows,
    }


def _full_report():
    return _report([
        _row("pytorch", "fp32", "pass", 28.04, vs_ref=float("inf")),
        _row("onnxruntime-cpu", "fp32", "pass", 28.0288, vs_ref=62.5),
        _row("onnxruntime-cpu", "int8", "fail", 27.70, reason="delta -0.340 dB exceeds gate 0.2", vs_ref=38.1),
        _row("tensorrt", "fp16", "skipped", None, reason="tensorrt not installed"),
    ])


def _crops(n):
    rng = np.random.default_rng(0)
    return [(f"crop {i}", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for i in range(n)]


def _assert_pngs(paths):
    for path in paths[1:]:
        with Image.open(path) as im:
            assert im.format == "PNG" and 100 <= im.width <= 4000 and 50 <= im.height <= 4000, (path, im.size)


def test_write_report(tmp_path):
    report = _full_report()
    paths = write_report(tmp_path / "out", report, _crops(6))
    assert [p.name for p in paths] == NAMES
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(NAMES)  # no temporary files left
    _assert_pngs(paths)

    md = paths[0].read_text()
    table = md.split("## Accuracy")[1].split("## Throughput")[0]
    for r in report["rows"]:
        line = next(line for line in table.splitlines() if f"| {r['backend']} " in line and r["precision"] in line)
        assert r["status"] in line
    skipped = next(line for line in table.splitlines() if "tensorrt" in line)
    assert [c.strip() for c in skipped.strip("|").split("|")][3:7] == ["-"] * 4
    verdict = md.split("## Verdict")[1]
    assert "**FAIL**" in verdict and "onnxruntime-cpu int8" in verdict and "exceeds gate 0.2" in verdict
    assert "320x180" in md and "480x270" in md
    for name in NAMES[1:]:
        assert f"]({name})" in md


def test_format_rows():
    lines = format_rows(_full_report()).splitlines()
    assert len(lines) == 2 + 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["backend", "precision", "status", "Y-PSNR", "Y-SSIM", "delta dB", "vs-reference dB",
                        "gate dB", "reason"]
    assert set(lines[1]) == {"|", "-"}
    assert cells[2] == ["pytorch", "fp32", "pass", "28.040", "0.7891", "0.000", "inf", "0.010", ""]
    assert cells[3][3:7] == ["28.029", "0.7891", "-0.011", "62.500"]
    assert cells[4][3:] == ["27.700", "0.7891", "-0.340", "38.100", "0.200", "delta -0.340 dB exceeds gate 0.2"]
    assert cells[5] == ["tensorrt", "fp16", "skipped", "-", "-", "-", "-", "0.050", "tensorrt not installed"]
    assert len({len(line) for line in lines}) == 1  # columns are padded to line up on the console


def test_format_rows_escapes_reason():
    report = _report([_row("pytorch", "fp32", "fail", 28.0, reason="a | b\nc")])
    assert format_rows(report).splitlines()[2].endswith("| a \\| b c |")


def test_degenerate_inputs(tmp_path):
    report = _report([_row("pytorch", "fp32", "skipped", None, reason="no model")])
    paths = write_report(tmp_path, report, [])
    _assert_pngs(paths)
    md = paths[0].read_text()
    assert "Not measured." in md and "**FAIL**" in md

    paths = write_report(tmp_path, _report([], passed=True), [])
    _assert_pngs(paths)
    assert "**PASS**" in paths[0].read_text()


def test_no_throughput_and_one_crop(tmp_path):
    report = _report([_row("pytorch", "fp32", "pass", 28.04, throughput=False)], passed=True)
    paths = write_report(tmp_path, report, _crops(1))
    _assert_pngs(paths)
    assert "Not measured." in paths[0].read_text()
