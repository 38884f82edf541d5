"""`make_bundle` and the edge verifier: what the bundle holds, that its tarball extracts safely, the refusals (an
incomplete run, an existing --out, a tampered bundle), the TensorRT path with fakes, and end to end: the extracted
bundle's `make verify` passes in a virtualenv with only numpy, Pillow and onnxruntime (no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.deploy import edge
from pipeline.backends.base import Runner
from pipeline.backends.ort_runner import OrtRunner
from pipeline.deploy.bundle import make_bundle
from pipeline.config import load_config
from pipeline.data.imageio import read_rgb
from pipeline.errors import UserError
from pipeline.metrics import psnr_y
from pipeline.rundir import ONNX, sha256_file

FAST = ['verify.latency_sizes=["40x24"]', "verify.repeats=2", "verify.warmup=0"]
MODELS = ("student.fp32.onnx", "student.fp16.onnx", "student.int8.onnx")
# The interpreter of the torch-free virtualenv; point it at a Python 3.10 to check the JetPack 6 floor.
EDGE_PYTHON = os.environ.get("FACD_EDGE_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=FAST)


@pytest.fixture(scope="module")
def bundle(cfg, exported_run, tmp_path_factory) -> Path:
    """The tarball of the exported run's bundle; the folder is beside it."""
    return make_bundle(cfg, exported_run, tmp_path_factory.mktemp("out") / "deploy", progress=False)


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory) -> Path:
    """A virtualenv's python with numpy, Pillow and onnxruntime only."""
    venv = tmp_path_factory.mktemp("venv") / "edge"
    subprocess.run([EDGE_PYTHON, "-m", "venv", str(venv)], check=True, env=_clean_env())
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "numpy", "pillow",
                    "onnxruntime"], check=True, timeout=900, env=_clean_env())
    return python


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _extract(tarball: Path, dest: Path) -> Path:
    """Extract after checking that every member is a plain file or folder inside `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for m in members:
            assert m.isfile() or m.isdir(), m.name
            assert (dest / m.name).resolve().is_relative_to(dest.resolve()), m.name
        tar.extractall(dest, filter="data")
    (top,) = {Path(m.name).parts[0] for m in members}
    return dest / top


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def test_the_bundle_holds_models_golden_set_runtime_and_checksums(bundle, exported_run):
    folder = bundle.with_name("deploy")
    info = json.loads((folder / "bundle.json").read_text())
    assert info["format"] == edge.FORMAT and info["scale"] == 4 and info["latency_sizes"] == ["40x24"]
    assert info["gates"] == {"fp32": 0.01, "fp16": 0.05, "int8": 0.2}
    assert info["engine"]["timing_cache"] == "plans/trt-timing.cache" and info["engine"]["profile"] == "720p"
    files = _files(folder)
    assert info["files"] == {k: v for k, v in files.items() if k != "bundle.json"}
    for name in (*MODELS, "calib.npz", "manifest.json"):
        assert files[name] == sha256_file(exported_run / name), name
    assert {"Makefile", "README.md", "runtime/pipeline/edge.py", "runtime/pipeline/metrics.py"} <= set(files)
    assert all(name.endswith(".py") for name in files if name.startswith("runtime/"))
    assert "runtime/pipeline/data/build_embedded.py" not in files
    assert "verify:" in (folder / "Makefile").read_text()

    golden = json.loads((folder / "golden" / "golden.json").read_text())
    assert [g["name"] for g in golden["images"]] == ["lxqt-after-the-rain", "lxqt-appleflower", "lxqt-butterfly",
                                                     "lxqt-drop"]
    for g in golden["images"]:
        lr, sr, hr = (read_rgb(folder / "golden" / g[k]) for k in ("lr", "sr_fp32", "hr"))
        assert max(lr.shape[:2]) <= 96 and sr.shape == hr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert g["psnr_y"] == pytest.approx(psnr_y(sr, hr, 4))


def test_the_tarball_extracts_safely_to_the_same_files(bundle, tmp_path):
    extracted = _extract(bundle, tmp_path / "x")
    assert extracted.name == "deploy"
    assert _files(extracted) == _files(bundle.with_name("deploy"))


def test_both_int8_models_are_carried_and_the_cpu_one_runs_on_the_cpu(bundle, tmp_path):
    folder = _extract(bundle, tmp_path / "with")
    assert json.loads((folder / "bundle.json").read_text())["models"]["int8-cpu"] == ONNX["int8-cpu"]
    readme = (folder / "README.md").read_text()
    assert "`student.int8.onnx`: TensorRT" in readme and f"`{ONNX['int8-cpu']}`: ONNX Runtime on CPUs" in readme
    assert edge.main(["verify", "--bundle", str(folder), "--backend", "onnxruntime", "-q"]) == 0
    rows = {r["precision"]: r for r in json.loads((folder / edge.REPORT_JSON).read_text())["rows"]}
    assert rows["int8"]["model"] == ONNX["int8-cpu"] and rows["fp32"]["model"] == "student.fp32.onnx"


def test_an_incomplete_run_is_refused_naming_what_is_missing(cfg, exported_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(exported_run, copy, ignore=shutil.ignore_patterns("student.int8*.onnx", "calib.npz"))
    with pytest.raises(UserError, match=r"missing student\.int8\.onnx \(made by `pipeline quantize`\), "
                                        r"student\.int8-cpu\.onnx .*, calib\.npz"):
        make_bundle(cfg, copy, tmp_path / "deploy", progress=False)
    (copy / "student.int8.onnx").write_bytes((exported_run / "student.int8.onnx").read_bytes()[:-1])
    for name in ("calib.npz", "student.int8-cpu.onnx"):
        shutil.copyfile(exported_run / name, copy / name)
    with pytest.raises(UserError, match=r"student\.int8\.onnx differ\(s\) from the sha256 in manifest\.json"):
        make_bundle(cfg, copy, tmp_path / "deploy", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_out_is_refused_and_force_replaces_it_whole(cfg, exported_run, tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists; choose another --out, or pass --force"):
        make_bundle(cfg, exported_run, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    shutil.rmtree(out)
    tarball = tmp_path / "deploy.tar.gz"
    tarball.write_text("mine")
    with pytest.raises(UserError, match="deploy.tar.gz already exists"):
        make_bundle(cfg, exported_run, out, progress=False)
    assert tarball.read_text() == "mine" and not out.exists()
    with pytest.raises(UserError, match="would replace the run directory"):
        make_bundle(cfg, exported_run, exported_run, force=True, progress=False)

    tarball.unlink()
    assert make_bundle(cfg, exported_run, out, progress=False) == tarball
    (out / "mine.txt").write_text("old")
    assert make_bundle(cfg, exported_run, out, force=True, progress=False) == tarball
    assert not (out / "mine.txt").exists() and (out / "bundle.json").exists()
    assert _files(_extract(tarball, tmp_path / "x")) == _files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "deploy.tar.gz", "x"]  # no temporary left


def test_edge_verify_names_missing_or_changed_files_and_fails_gates(bundle, tmp_path, capsys):
    folder = _extract(bundle, tmp_path)
    (folder / "golden" / "lr" / "lxqt-butterfly.png").write_bytes(b"not a png")
    (folder / "student.fp16.onnx").unlink()
    assert edge.main(["verify", "--bundle", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert "missing student.fp16.onnx; sha256 differs: golden/lr/lxqt-butterfly.png" in err
    assert edge.main(["verify", "--bundle", str(tmp_path), "-q"]) == 2
    assert "has no bundle.json" in capsys.readouterr().err

    folder = _extract(bundle, tmp_path / "gates")
    info = json.loads((folder / "bundle.json").read_text())
    info["gates"]["fp16"] = 0.0  # no difference allowed: the FP16 row differs a little
    (folder / "bundle.json").write_text(json.dumps(info))
    assert edge.main(["verify", "--bundle", str(folder), "--backend", "onnxruntime", "-q"]) == 1
    report = json.loads((folder / edge.REPORT_JSON).read_text())
    assert not report["passed"] and [r["precision"] for r in report["rows"] if r["status"] == "fail"] == ["fp16"]
    assert "onnxruntime-cpu fp16: |delta|" in capsys.readouterr().err


class StandInPlanRunner(Runner):
    """Plays TrtRunner for the routing test: runs the plan's ONNX with ONNX Runtime, with a profile maximum of 96x96.
    No TensorRT runs here; this checks only what edge verify does when TensorRT is reported usable."""

    def __init__(self, plan: Path):
        self.ort = OrtRunner(plan.with_suffix(".onnx"))
        super().__init__(self.ort.scale, max_lr_hw=(96, 96))
        self.name = f"tensorrt-{self.ort.precision}"

    def activate(self) -> None:
        self.ort.activate()

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.ort.forward(x)

    def gpu_times_ms(self, x: np.ndarray, iters: int) -> list[float]:
        return [0.5] * iters


def test_edge_verify_takes_the_plan_route_when_tensorrt_is_reported_usable(bundle, tmp_path, monkeypatch, capsys):
    import pipeline.backends.trt_runner
    import pipeline.backends.trt_engine

    folder = _extract(bundle, tmp_path)
    builds = []

    def build_engines(onnx_by_precision, out_dir, sec, scale, force=False):
        builds.append((dict(onnx_by_precision), out_dir, sec.timing_cache, scale))
        return [out_dir / Path(p).with_suffix(".plan").name for p in onnx_by_precision.values()]

    monkeypatch.setattr(pipeline.backends.trt_engine, "trt_status", lambda: (True, "TensorRT 10.3 on Orin"))
    monkeypatch.setattr(pipeline.backends.trt_engine, "build_engines", build_engines)
    monkeypatch.setattr(pipeline.backends.trt_runner, "TrtRunner",
                        lambda plan: StandInPlanRunner(folder / plan.name))
    info = json.loads((folder / "bundle.json").read_text())
    info["latency_sizes"] = ["40x24", "100x24"]
    (folder / "bundle.json").write_text(json.dumps(info))

    assert edge.main(["verify", "--bundle", str(folder), "--require", "trt", "-q"]) == 0
    assert "verifying with TensorRT 10.3 on Orin" in capsys.readouterr().out
    assert [b[0] for b in builds] == [{"fp16": folder / "student.fp16.onnx"}, {"int8": folder / "student.int8.onnx"}]
    assert {(b[1], b[2], b[3]) for b in builds} == {(folder / "plans", str(folder / "plans/trt-timing.cache"), 4)}
    report = json.loads((folder / edge.REPORT_JSON).read_text())
    assert [(r["backend"], r["precision"], r["status"]) for r in report["rows"]] == [
        ("tensorrt", "fp16", "pass"), ("tensorrt", "int8", "pass")]
    throughput = report["rows"][0]["throughput"]
    assert throughput[0]["lr_size"] == "40x24" and throughput[0]["p50_ms"] > 0 and throughput[0]["gpu_p50_ms"] == 0.5
    assert throughput[1] == {"lr_size": "100x24", "skipped": "above the plan's profile maximum 96x96"}
    assert edge.main(["verify", "--bundle", str(folder), "--require", "trt", "--backend", "onnxruntime"]) == 2


def test_make_verify_passes_in_a_torch_free_virtualenv(bundle, edge_python, tmp_path):
    check = subprocess.run([str(edge_python), "-c", "import torch"], capture_output=True, env=_clean_env())
    assert check.returncode != 0, "the edge virtualenv must not have torch"
    folder = _extract(bundle, tmp_path)
    env = _clean_env()
    done = subprocess.run(["make", "verify", f"PYTHON={edge_python}"], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("TensorRT not available (tensorrt is not installed): openvino is not installed (pip install openvino; "
            "the cpu extra has it): verifying with ONNX Runtime") in done.stdout
    report = json.loads((folder / edge.REPORT_JSON).read_text())
    assert report["passed"] and report["backend"] == "onnxruntime-cpu" and "torch" not in report["versions"]
    assert [r["precision"] for r in report["rows"]] == ["fp32", "fp16", "int8"]
    for row in report["rows"]:
        assert row["status"] == "pass" and abs(row["delta_db"]) <= row["gate_db"]
        assert row["throughput"][0]["lr_size"] == "40x24" and row["latency_ms_p50"] > 0
        assert len(row["per_image"]) == 4
    assert report["rows"][0]["psnr_vs_golden"] > 50

    done = subprocess.run(["make", "verify", f"PYTHON={edge_python}", "REQUIRE=trt"], cwd=folder,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "TensorRT is required here but not usable: tensorrt is not installed" in done.stderr
