"""Verification: every backend x precision on the eval set against the PyTorch FP32 reference, with gates, and
throughput at fixed LR sizes. A backend this machine lacks is a "skipped" row with its reason, never a pass.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import BicubicRunner, Runner, latency
from pipeline.config import Config
from pipeline.data.datasets import PairFolder
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import evaluate, mean_row
from pipeline.machine import machine
from pipeline.metrics import rgb_to_y
from pipeline.rundir import ONNX, PLANS, STUDENT

log = logging.getLogger("pipeline")

ORT_DEVICES = ("cpu", "cuda", "tensorrt")
CROP = 40  # LR side of the visual comparison crop


@dataclass
class Candidate:
    """One row to verify: how to make its runner, or why it cannot run here."""

    backend: str
    precision: str
    model: str
    make: Callable[[], Runner] | None
    reason: str = ""


def candidates(run_root: Path, student: Any) -> list[Candidate]:
    """The reference first, then ONNX Runtime on every provider for every precision, OpenVINO on the CPU (FP32 and
    the CPU INT8 model), then the TensorRT plans."""
    from pipeline.backends.openvino_runner import PRECISIONS, OpenVinoRunner, openvino_status
    from pipeline.backends.ort_runner import OrtRunner, provider_status
    from pipeline.backends.torch_runner import TorchRunner
    from pipeline.backends.trt_runner import TrtRunner
    from pipeline.backends.trt_engine import trt_status

    rows = [Candidate("pytorch", "fp32", STUDENT, lambda: TorchRunner(student))]
    for device in ORT_DEVICES:
        ok, reason = provider_status(device)
        for precision, name in ONNX.items():
            if precision == "int8-cpu" and device != "cpu":
                continue
            path = run_root / name
            make = (lambda p=path, d=device: OrtRunner(p, d)) if ok else None
            rows.append(Candidate(f"onnxruntime-{device}", precision, name, make, reason))
    ok, reason = openvino_status()
    for precision in PRECISIONS:
        path = run_root / ONNX[precision]
        rows.append(Candidate("openvino", precision, path.name, (lambda p=path: OpenVinoRunner(p)) if ok else None,
                              "" if ok else reason))
    ok, reason = trt_status()
    for precision in ("fp16", "int8"):
        plan = run_root / PLANS[precision]
        if ok and not plan.exists():
            reason = f"no {plan.name}: build it on this device with `pipeline build`"
        make = (lambda p=plan: TrtRunner(p)) if ok and plan.exists() else None
        rows.append(Candidate("tensorrt", precision, plan.name, make, reason))
    return rows


def gate_for(cfg: Config, precision: str) -> float:
    v = cfg.verify
    gates = {"fp32": v.gate_fp32_db, "fp16": v.gate_fp16_db, "int8": v.gate_int8_db, "int8-cpu": v.gate_int8_db}
    return gates[precision]


def verify(cfg: Config, rows_to_run: list[Candidate], require: list[str] = (),
           progress: bool = True) -> tuple[dict[str, Any], list]:
    """Run every candidate (one alive at a time); returns the report dict and the labelled visual crops.

    A backend named in `require` ('trt' stands for 'tensorrt') that could not run turns its rows into failures."""
    required = [{"trt": "tensorrt"}.get(name, name) for name in require]
    known = list(dict.fromkeys(c.backend for c in rows_to_run))
    unknown = [name for name, backend in zip(require, required) if backend not in known]
    if unknown:
        raise UserError(f"--require {', '.join(unknown)}: no such backend (known: trt, {', '.join(known)})")
    pairs = list(PairFolder(cfg.data.eval, cfg.scale))
    s = cfg.scale
    first = pairs[0]
    cy, cx = max(0, first.lr.shape[0] // 2 - CROP // 2), max(0, first.lr.shape[1] // 2 - CROP // 2)
    crop_hr = (slice(cy * s, (cy + CROP) * s), slice(cx * s, (cx + CROP) * s))
    bicubic = mean_row(evaluate(BicubicRunner(s), pairs, s, progress))
    crops = [("LR (bicubic)", BicubicRunner(s).infer(first.lr)[crop_hr])]
    reference: list[np.ndarray] | None = None
    ort_outputs: dict[str, list[np.ndarray]] = {}  # what TensorRT is compared with, per precision
    rows = []
    for cand in rows_to_run:
        row: dict[str, Any] = {"backend": cand.backend, "precision": cand.precision, "model": cand.model,
                               "status": "skipped", "reason": cand.reason, "psnr_y": None, "ssim_y": None,
                               "delta_db": None, "psnr_vs_reference": None, "gate_db": gate_for(cfg, cand.precision),
                               "latency_ms_p50": None, "latency_ms_p95": None, "throughput": []}
        rows.append(row)
        if cand.make is None:
            continue
        try:
            runner = cand.make()
            with PeakRss() as rss, runner:
                outputs: list[np.ndarray] = []
                per_image = evaluate(runner, pairs, s, progress, outputs)
                timed = [latency(runner, size, cfg.verify.warmup, cfg.verify.repeats)
                         for size in cfg.verify.latency_sizes]
            row["throughput"] = [t for t in timed if "skipped" not in t]
            row["latency_skipped"] = [f"{t['lr_size']}: {t['skipped']}" for t in timed if "skipped" in t]
        except UserError as e:  # e.g. a plan built for another GPU: the artifact is there but cannot serve
            row["status"], row["reason"] = "fail", str(e)
            continue
        for t in row["throughput"]:
            t["peak_mem_mb"] = rss.peak_mb
        if cand.backend == "onnxruntime-cpu":
            ort_outputs[cand.precision] = outputs
        if cand.backend == "tensorrt" and cand.precision in ort_outputs:
            row["psnr_vs_onnxruntime"] = _pooled_psnr_y(outputs, ort_outputs[cand.precision])
        if reference is None:
            reference = outputs
        mean = mean_row(per_image)
        row.update(psnr_y=mean["psnr_y"], ssim_y=mean["ssim_y"], per_image=per_image,
                   psnr_vs_reference=_pooled_psnr_y(outputs, reference))
        if row["throughput"]:
            row["latency_ms_p50"], row["latency_ms_p95"] = (row["throughput"][-1]["p50_ms"],
                                                            row["throughput"][-1]["p95_ms"])
        crops.append((f"{cand.backend} {cand.precision}", outputs[0][crop_hr]))
    crops.append(("HR", first.hr[crop_hr]))
    ref_psnr = rows[0]["psnr_y"]
    for row in rows:
        if row["psnr_y"] is None or row["status"] == "fail":
            continue
        row["delta_db"] = row["psnr_y"] - ref_psnr
        ok = abs(row["delta_db"]) <= row["gate_db"]
        row["status"] = "pass" if ok else "fail"
        if not ok:
            row["reason"] = (f"|delta| {abs(row['delta_db']):.3f} dB > gate {row['gate_db']} dB against the PyTorch "
                             "FP32 reference")
    for row in rows:
        if row["backend"] in required and row["status"] == "skipped":
            row["status"], row["reason"] = "fail", f"required but skipped: {row['reason']}"
    report = {"scale": s, "data": cfg.data.eval, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": verify_machine(), "gates": {p: gate_for(cfg, p) for p in ONNX},
              "bicubic": {"psnr_y": bicubic["psnr_y"], "ssim_y": bicubic["ssim_y"]},
              "latency": f"one forward call on a float32 batch of 1, host to host, after {cfg.verify.warmup} "
                         f"warm-up calls; p50/p95 over {cfg.verify.repeats} calls",
              "rows": rows, "passed": all(r["status"] != "fail" for r in rows)}
    return report, crops


def _pooled_psnr_y(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Y-PSNR of all outputs against the reference outputs, one MSE over every pixel (inf when identical)."""
    se = sum(float(np.sum((rgb_to_y(a) - rgb_to_y(b)) ** 2)) for a, b in zip(outputs, reference))
    n = sum(a.shape[0] * a.shape[1] for a in outputs)
    return math.inf if se == 0 else 10 * math.log10(255.0**2 / (se / n))


class PeakRss:
    """Peak resident memory of this process above its level on entry, sampled every 5 ms (Linux; else None)."""

    def __enter__(self) -> PeakRss:
        self.peak_mb: float | None = None
        self._base = _rss_mb()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_mb() or 0.0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._base is not None:
            self._thread.join()
            self.peak_mb = self._peak - self._base


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def verify_machine() -> dict[str, Any]:
    """The CPU record of every benchmark (model, ISA flags, cores, platform), plus the GPU and OpenVINO's state."""
    from pipeline.backends.openvino_runner import openvino_status

    gpu = None
    if "torch" in sys.modules:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {**machine(), "gpu": gpu, "openvino": openvino_status()[1]}


def failing(report: dict[str, Any]) -> list[str]:
    rows = [f"{r['backend']} {r['precision']} ({r['model']}): {r['reason']}" for r in report["rows"]
            if r["status"] == "fail"]
    gate = report.get("latency_budget")
    return rows + ([f"latency budget: {gate['reason']}"] if gate and gate["status"] == "fail" else [])
