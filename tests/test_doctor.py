"""`pipeline doctor`: runs on this machine, and stays soft when binaries are missing, hang or probes raise."""

import json
import os
import stat
import sys
import subprocess

import pytest

import kernels.build
from pipeline import doctor, machine
from pipeline.doctor import doctor_report, enables, format_doctor
from pipeline.backends.trt_engine import trt_status

SECTIONS = ("cpu", "gpu", "cuda_runtime", "tensorrt", "cuda_python", "onnxruntime", "torch", "nvcc", "enables")


def _fake_binary(folder, name, script):
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_doctor_runs_here():
    report = doctor_report()
    assert set(SECTIONS) <= report.keys()
    json.dumps(report)
    text = format_doctor(report)
    for label in ("This machine", "CPU", "GPU", "CUDA runtime", "TensorRT", "cuda-python", "ONNX Runtime", "torch",
                  "nvcc", "What it enables", "TensorRT engines", "fused CUDA kernel", "INT8 on the CPU"):
        assert label in text
    assert report["cpu"]["model"]
    if not trt_status()[0]:
        assert "-> verify uses ONNX Runtime" in report["enables"]["TensorRT engines"]


def test_missing_binaries_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)

    def no_nvcc():
        raise kernels.build.KernelUnavailable("nvcc not found")

    monkeypatch.setattr(kernels.build, "find_nvcc", no_nvcc)
    report = doctor_report()
    assert report["cpu"]["model"]  # from /proc/cpuinfo without lscpu
    assert report["gpu"].get("source") != "nvidia-smi"
    assert report["nvcc"]["version"] is None
    assert report["enables"]["fused CUDA kernel"].startswith("no (nvcc not found")
    assert "GPU" in format_doctor(report)


def test_fake_nvidia_smi_is_parsed(monkeypatch, tmp_path):
    _fake_binary(tmp_path, "nvidia-smi", 'echo "NVIDIA H100 80GB HBM3, 550.54.15, 9.0"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu = doctor_report()["gpu"]
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "compute_capability": "9.0", "count": 1,
                   "source": "nvidia-smi"}


def test_hanging_binaries_time_out(monkeypatch, tmp_path):
    for name in ("nvidia-smi", "lscpu"):
        _fake_binary(tmp_path, name, "exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(machine, "PROBE_TIMEOUT_S", 0.2)
    report = doctor_report()
    assert report["gpu"].get("source") != "nvidia-smi" and report["cpu"]["model"]


def test_any_probe_failure_is_reported_not_raised(monkeypatch):
    def boom(*args, **kwargs):
        raise subprocess.SubprocessError("boom")

    def broken():
        raise RuntimeError("broken install")

    monkeypatch.setattr(machine.subprocess, "run", boom)
    monkeypatch.setattr(doctor, "_onnxruntime", broken)
    report = doctor_report()
    assert report["onnxruntime"] == {"error": "RuntimeError: broken install"}
    assert report["enables"]["ONNX Runtime"].startswith("no (RuntimeError: broken install)")
    assert "probe failed (RuntimeError: broken install)" in format_doctor(report)


def _report(trt_usable, torch_cuda, nvcc_version, providers=("CPUExecutionProvider",), flags=()):
    return {
        "cpu": {"model": "cpu", "cores": 8, "flags": list(flags)},
        "tensorrt": {"version": "10.3.0" if trt_usable else None, "usable": trt_usable,
                     "detail": "TensorRT 10.3.0 on Orin (compute capability 8.7)" if trt_usable
                     else "tensorrt is not installed"},
        "onnxruntime": {"version": "1.32.0", "providers": list(providers)},
        "torch": {"version": "2.13.0", "cuda": torch_cuda, "device": "Orin" if torch_cuda else None},
        "nvcc": {"version": nvcc_version, "path": "/usr/local/cuda/bin/nvcc"} if nvcc_version
        else {"version": None, "reason": "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)"},
    }


@pytest.mark.parametrize(("report", "expected"), [
    (_report(True, True, "12.6", ("CUDAExecutionProvider", "CPUExecutionProvider"), ("avx2",)), {
        "TensorRT engines": "yes (TensorRT 10.3.0 on Orin (compute capability 8.7)) -> `pipeline build`, "
                            "verify runs the plans",
        "ONNX Runtime": "GPU (CUDAExecutionProvider)",
        "fused CUDA kernel": "yes (nvcc 12.6, torch CUDA)",
        "training": "GPU (Orin)",
        "INT8 on the CPU": "no VNNI/AMX: ONNX Runtime's U8S8 kernels sum u8 x s8 pairs in a saturating int16 "
                           "(VPMADDUBSW); student.int8-cpu.onnx keeps its weights 7-bit so it is exact here too, an "
                           "INT8 model with 8-bit weights (e.g. student.int8.onnx) is not"}),
    (_report(False, False, "13.0", flags=("avx512_vnni",)), {
        "TensorRT engines": "no (tensorrt is not installed) -> verify uses ONNX Runtime",
        "ONNX Runtime": "CPU provider only",
        "fused CUDA kernel": "build only (nvcc present, no GPU for torch) -> chunked PyTorch loss",
        "training": "CPU only (torch sees no CUDA GPU)",
        "INT8 on the CPU": "VNNI: exact int32 dot products; student.int8-cpu.onnx (7-bit weights) computes what "
                           "it computes on every x86 CPU"}),
    (_report(False, False, None), {
        "fused CUDA kernel": "no (nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)) -> chunked PyTorch loss"}),
])
def test_what_the_machine_enables(report, expected):
    lines = enables(report)
    assert {k: lines[k] for k in expected} == expected


@pytest.mark.parametrize(("flags", "kind"), [
    (("avx2",), "vpmaddubsw"),  # e.g. AMD EPYC Zen 2/3, Intel Haswell .. Skylake client
    (("avx2", "avx512f"), "vpmaddubsw"),  # Skylake-SP: AVX-512 without VNNI still saturates
    (("avx2", "avx_vnni"), "vnni"),  # Alder Lake
    (("avx2", "avx512f", "avx512_vnni"), "vnni"),  # Cascade Lake, Zen 4
    (("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"), "amx"),  # Sapphire Rapids
    ((), "unknown"),
])
def test_int8_dot_product_kind_from_cpu_flags(flags, kind):
    assert machine.int8_dot_product(list(flags)) == kind


def test_openvino_line():
    found = enables({**_report(False, False, None), "openvino": {"version": "2026.4.1", "devices": ["CPU"]}})
    assert found["OpenVINO"] == "yes (2026.4.1) -> verify rows, the default CPU backend of upscale and edge verify"
    absent = {"version": None, "reason": "openvino is not installed"}
    missing = enables({**_report(False, False, None), "openvino": absent})
    assert missing["OpenVINO"] == "no (openvino is not installed) -> ONNX Runtime on the CPU"


def test_cpu_probe_computes_here_and_says_why_when_it_cannot(monkeypatch):
    assert doctor.cpu_probe() == (True, "")

    class WrongSession:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, outputs, feeds):
            return [feeds["x"] * 3]

    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", WrongSession)
    ok, why = doctor.cpu_probe()
    assert not ok and why == "ONNX Runtime's CPU provider computed x + x = [3.0, 6.0] for x = [1, 2]"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    ok, why = doctor.cpu_probe()
    assert not ok and why.startswith("ModuleNotFoundError") and "onnxruntime" in why
