"""`pipeline doctor`: what this machine has (CPU, GPU and driver, CUDA, TensorRT, cuda-python, ONNX Runtime, OpenVINO,
torch, nvcc) and what that enables (TensorRT engines, GPU ONNX Runtime, the fused CUDA kernel, GPU training, OpenVINO,
fast CPU INT8).

Every probe fails softly: a missing binary or module, a failing or hanging command (timeout) or an unexpected
exception becomes a line saying why, never a crash. TensorRT and cuda-python are reached only through
`pipeline.backends.trt_engine`, which probes the GPU before TensorRT is touched.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from typing import Any

from pipeline.backends import trt_engine as engine
from pipeline.machine import cpu_info, int8_dot_product, run_command


def _soft(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return probe()
    except Exception as e:  # noqa: BLE001 - doctor reports every failure instead of crashing
        return {"error": f"{type(e).__name__}: {e}"}


def _gpu() -> dict[str, Any]:
    query = "--format=csv,noheader"
    out = run_command(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", query]) or run_command(
        ["nvidia-smi", "--query-gpu=name,driver_version", query])  # older drivers lack compute_cap
    if out and out.strip():
        lines = out.strip().splitlines()
        name, driver, *cc = (part.strip() for part in lines[0].split(","))
        return {"name": name, "driver": driver, "compute_capability": cc[0] if cc else None, "count": len(lines),
                "source": "nvidia-smi"}
    ok, why = engine.cuda_probe()
    if not ok:
        return {"name": None, "reason": f"nvidia-smi not found or failed; {why}"}
    info = engine.cuda_device_info()
    return {"name": info["gpu"], "driver": f"CUDA {info['cuda_driver']}", "compute_capability":
            info["compute_capability"], "source": "cuda-python"}


def _cuda_runtime() -> dict[str, Any]:
    if engine.cuda_probe()[0]:
        return {"version": engine.cuda_device_info()["cuda_runtime"], "source": "cuda-python"}
    try:
        import torch
    except ImportError:
        return {"version": None}
    return {"version": torch.version.cuda, "source": "torch build"}


def _cuda_python() -> dict[str, Any]:
    version = engine.cuda_python_version()
    usable, why = engine.cuda_probe() if version else (False, "")
    return {"version": version, "usable": usable, "detail": why}


def _tensorrt() -> dict[str, Any]:
    usable, detail = engine.trt_status()
    return {"version": engine.tensorrt_version(), "usable": usable, "detail": detail}


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"version": None}
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def _openvino() -> dict[str, Any]:
    from pipeline.backends.openvino_runner import openvino_status

    ok, why = openvino_status()
    if not ok:
        return {"version": None, "reason": why}
    import openvino

    return {"version": why.removeprefix("OpenVINO "), "devices": openvino.Core().available_devices}


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"version": None}
    cuda = torch.cuda.is_available()
    return {"version": torch.__version__, "cuda": cuda, "cuda_build": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else None}


def _nvcc() -> dict[str, Any]:
    from kernels.build import KernelUnavailable, find_nvcc

    try:
        path = find_nvcc()
    except KernelUnavailable:
        return {"version": None, "reason": "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)"}
    release = re.search(r"release ([\d.]+)", run_command([path, "--version"]) or "")
    if release is None:
        return {"version": None, "path": path, "reason": f"{path} --version failed"}
    return {"version": release[1], "path": path}


def cpu_probe() -> tuple[bool, str]:
    """(True, "") when the CPU path computes here: a PyTorch convolution, and ONNX Runtime's CPU provider running a
    one-node model with the expected result; else (False, why not). The CPU image's health check."""
    try:
        import numpy as np
        import onnxruntime as ort
        import torch
        from onnx import TensorProto, helper

        y = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
        if y.item() != 9.0:
            return False, f"PyTorch's 3x3 convolution of ones gave {y.item()}, not 9"
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0]
    except Exception as e:  # noqa: BLE001 - a missing or broken install is the answer, not a crash
        return False, f"{type(e).__name__}: {e}"
    if out.tolist() != [2.0, 4.0]:
        return False, f"ONNX Runtime's CPU provider computed x + x = {out.tolist()} for x = [1, 2]"
    return True, ""


def enables(report: dict[str, Any]) -> dict[str, str]:
    """What the probed machine can do, one line per capability, with the fallback where it cannot."""
    trt, ort, torch = report["tensorrt"], report["onnxruntime"], report["torch"]
    nvcc, flags = report["nvcc"], report["cpu"].get("flags", [])
    out = {}
    if trt.get("usable"):
        out["TensorRT engines"] = f"yes ({trt['detail']}) -> `pipeline build`, verify runs the plans"
    else:
        why = trt.get("detail") or trt.get("error", "")
        out["TensorRT engines"] = f"no ({why}) -> verify uses ONNX Runtime"
    providers = ort.get("providers") or []
    gpu_providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in providers]
    if not ort.get("version"):
        why = ort.get("error") or "onnxruntime not installed"
        out["ONNX Runtime"] = f"no ({why}) -> no ONNX verification (pip install onnxruntime)"
    elif gpu_providers:
        out["ONNX Runtime"] = f"GPU ({', '.join(gpu_providers)})"
    else:
        out["ONNX Runtime"] = "CPU provider only"
    if nvcc.get("version") and torch.get("cuda"):
        out["fused CUDA kernel"] = f"yes (nvcc {nvcc['version']}, torch CUDA)"
    elif nvcc.get("version"):
        out["fused CUDA kernel"] = "build only (nvcc present, no GPU for torch) -> chunked PyTorch loss"
    else:
        why = nvcc.get("reason") or nvcc.get("error")
        out["fused CUDA kernel"] = f"no ({why}) -> chunked PyTorch loss"
    out["training"] = f"GPU ({torch['device']})" if torch.get("cuda") else "CPU only (torch sees no CUDA GPU)"
    ov = report.get("openvino", {})
    out["OpenVINO"] = (f"yes ({ov['version']}) -> verify rows, the default CPU backend of upscale and edge verify"
                       if ov.get("version") else
                       f"no ({ov.get('reason') or ov.get('error')}) -> ONNX Runtime on the CPU")
    out["INT8 on the CPU"] = {
        "amx": "AMX-INT8: exact int32 dot products; student.int8-cpu.onnx (7-bit weights) computes what it computes "
               "on every x86 CPU",
        "vnni": "VNNI: exact int32 dot products; student.int8-cpu.onnx (7-bit weights) computes what it computes "
                "on every x86 CPU",
        "vpmaddubsw": "no VNNI/AMX: ONNX Runtime's U8S8 kernels sum u8 x s8 pairs in a saturating int16 "
                      "(VPMADDUBSW); student.int8-cpu.onnx keeps its weights 7-bit so it is exact here too, an INT8 "
                      "model with 8-bit weights (e.g. student.int8.onnx) is not",
        "unknown": "no AVX2: integer kernels of unknown speed; verify gates the INT8 models here",
    }[int8_dot_product(flags)]
    return out


def doctor_report() -> dict[str, Any]:
    """Everything `pipeline doctor` prints, as data (JSON-serialisable)."""
    report = {
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "cpu": _soft(cpu_info),
        "gpu": _soft(_gpu),
        "cuda_runtime": _soft(_cuda_runtime),
        "tensorrt": _soft(_tensorrt),
        "cuda_python": _soft(_cuda_python),
        "onnxruntime": _soft(_onnxruntime),
        "openvino": _soft(_openvino),
        "torch": _soft(_torch),
        "nvcc": _soft(_nvcc),
    }
    report["enables"] = enables(report)
    return report


def _line(section: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> str:
    return f"probe failed ({section['error']})" if "error" in section else text(section)


def format_doctor(report: dict[str, Any]) -> str:
    cpu, gpu, cuda, trt = report["cpu"], report["gpu"], report["cuda_runtime"], report["tensorrt"]
    ort, torch, nvcc = report["onnxruntime"], report["torch"], report["nvcc"]
    machine = {
        "platform": report["platform"],
        "CPU": _line(cpu, lambda c: f"{c['model']}, {c['cores']} cores"
                     + (f" ({', '.join(c['flags'])})" if c["flags"] else "")),
        "GPU": _line(gpu, lambda g: f"{g['name']}, driver {g['driver']}, compute capability "
                     f"{g['compute_capability'] or '?'} (via {g['source']})" if g["name"] else f"none ({g['reason']})"),
        "CUDA runtime": _line(cuda, lambda c: f"{c['version']} ({c['source']})" if c["version"] else "none"),
        "TensorRT": _line(trt, lambda t: t["version"] or "not installed"),
        "cuda-python": _line(report["cuda_python"], lambda c: (c["version"] + ("" if c["usable"] else
                             f" ({c['detail']})")) if c["version"] else "not installed"),
        "ONNX Runtime": _line(ort, lambda o: f"{o['version']} ({', '.join(o['providers'])})" if o["version"]
                              else "not installed"),
        "OpenVINO": _line(report["openvino"], lambda o: f"{o['version']} ({', '.join(o['devices'])})"
                          if o["version"] else "not installed"),
        "torch": _line(torch, lambda t: (f"{t['version']}, CUDA " + (f"available ({t['device']})" if t["cuda"]
                       else "not available")) if t["version"] else "not installed"),
        "nvcc": _line(nvcc, lambda n: f"{n['version']} ({n['path']})" if n["version"] else n["reason"]),
    }
    width = max(map(len, [*machine, *report["enables"]]))
    lines = ["This machine"] + [f"  {k:<{width}}  {v}" for k, v in machine.items()]
    lines += ["What it enables"] + [f"  {k:<{width}}  {v}" for k, v in report["enables"].items()]
    return "\n".join(lines)
