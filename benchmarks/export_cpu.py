"""CPU inference on this CPU, side by side in one process: PyTorch FP32 eager, ONNX Runtime's CPU provider and
OpenVINO on the FP32 model and on the CPU INT8 model (`student.int8-cpu.onnx`: U8S8 QDQ with 7-bit weights, FP32
rest, calibrated on `calib.npz`), per student: latency at batch 1 and mean Y-PSNR / Y-SSIM on the embedded eval set.
`--backends` adds ONNX Runtime on the FP16 and TensorRT INT8 models (`ort-cpu-fp16`, `ort-cpu-int8`).

    python benchmarks/export_cpu.py [--models tiny_student edsr_baseline] [--checkpoint NAME=PATH ...]
        [--sizes 320x180 640x360] [--rounds 3] [--repeats 3] [--warmup 2] [--backends ...] [--pause-pid PID]
        [--out benchmarks/results/export_cpu.json]

The models are made by the pipeline's own stages (`stage_export`, `stage_quantize`, default config, x4) in a
temporary run directory. Then, in this one process, for `--rounds` rounds, each backend in turn is created, warmed
up (`--warmup` calls per size) and timed (`--repeats` calls per size), then released: one session alive at a time
(an EDSR-baseline session at 640x360 holds GBs), and the rounds interleave the backends so that load from elsewhere
hits them alike. p50 / p95 pool every timed call. `--pause-pid` stops another process (a training job on the same
cores, say) with SIGSTOP while timing and resumes it after. Without `--checkpoint` the weights are random (seed 0):
latency is meaningful, PSNR is not.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import count_params, create_model, save_checkpoint
from pipeline import stages
from pipeline.backends.base import Runner
from pipeline.backends.openvino_runner import OpenVinoRunner, openvino_status
from pipeline.backends.ort_runner import OrtRunner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import load_config, parse_size
from pipeline.data.datasets import PairFolder
from pipeline.machine import CPU_FLAGS, cpu_info, int8_dot_product
from pipeline.evaluation.evaluate import evaluate, mean_row
from pipeline.modelio import load_model
from pipeline.rundir import RunDir, versions, write_json_atomic, write_text_atomic

SCALE = 4
REFERENCE = "ort-cpu-fp32"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


BACKENDS = ("pytorch-fp32", "ort-cpu-fp32", "ort-cpu-int8-cpu", "openvino-fp32", "openvino-int8-cpu")
EXTRA = ("ort-cpu-fp16", "ort-cpu-int8")


def backends(model: torch.nn.Module, run: Path, names: list[str]) -> dict[str, Callable[[], Runner]]:
    every = {"pytorch-fp32": lambda: TorchRunner(model),
             **{f"ort-cpu-{p}": (lambda p=p: OrtRunner(run / f"student.{p}.onnx", "cpu"))
                for p in ("fp32", "fp16", "int8", "int8-cpu")},
             **{f"openvino-{p}": (lambda p=p: OpenVinoRunner(run / f"student.{p}.onnx")) for p in ("fp32", "int8-cpu")}}
    return {name: every[name] for name in names}


@contextlib.contextmanager
def paused(pid: int | None):
    """SIGSTOP `pid` for the block, SIGCONT after, whatever happens."""
    if pid:
        os.kill(pid, signal.SIGSTOP)
        log(f"  paused process {pid}")
    try:
        yield
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
            log(f"  resumed process {pid}")


def quality(factories: dict[str, Callable[[], Runner]]) -> dict[str, dict[str, float]]:
    pairs = list(PairFolder("embedded", SCALE))
    out = {}
    for name, make in factories.items():
        with make() as runner:
            out[name] = mean_row(evaluate(runner, pairs, SCALE, progress=False))
        log(f"  {name:18s} Y-PSNR {out[name]['psnr_y']:.3f} dB on the embedded eval set")
    return out


def measure(factories: dict[str, Callable[[], Runner]], sizes: list[str],
            args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    inputs = {s: np.random.default_rng(0).random((1, 3, *parse_size(s)), dtype=np.float32) for s in sizes}
    times: dict[str, dict[str, list[float]]] = {b: {s: [] for s in sizes} for b in factories}
    for r in range(args.rounds):
        for name, make in factories.items():
            with make() as runner:
                for size, x in inputs.items():
                    for _ in range(args.warmup):
                        runner.forward(x)
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        runner.forward(x)
                        times[name][size].append((time.perf_counter() - t0) * 1000)
            gc.collect()
            log(f"  round {r + 1}/{args.rounds} {name:18s} " + ", ".join(
                f"{s} {times[name][s][-1]:.0f} ms" for s in sizes) + f" (load {os.getloadavg()[0]:.1f})")
    return times


def latency_rows(times: dict[str, dict[str, list[float]]], sizes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        ref = float(np.percentile(times[REFERENCE][size], 50))
        for name, by_size in times.items():
            t = by_size[size]
            p50 = float(np.percentile(t, 50))
            rows.append({"backend": name, "lr_size": size, "n": len(t), "p50_ms": p50,
                         "p95_ms": float(np.percentile(t, 95)), "images_per_s": 1000 / p50,
                         "p50_vs_ort_fp32": p50 / ref, "times_ms": [round(v, 1) for v in t]})
    return rows


def markdown(report: dict[str, Any]) -> str:
    cpu = report["machine"]
    lines = [f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {', '.join(cpu['flags']) or 'none of'} "
             f"({'/'.join(report['cpu_flags_checked'])}; INT8 dot product: {report['int8_dot_product']}); "
             f"onnxruntime {report['versions'].get('onnxruntime')}, openvino {report['versions'].get('openvino')}, "
             f"torch {report['versions'].get('torch')}. "
             f"Batch 1, {report['settings']['rounds']} interleaved rounds x {report['settings']['repeats']} timed "
             f"calls after {report['settings']['warmup']} warm-up calls. Command: `{report['command']}`", ""]
    for m in report["models"]:
        load = (f"; 1-min load average {m['load_avg_1min'][0]:.1f} before timing, {m['load_avg_1min'][1]:.1f} after"
                if "load_avg_1min" in m else "")
        lines += [f"### {m['model']} ({m['weights']}, {m['params']:,} params{load})", "",
                  "| backend | LR size | p50 ms | p95 ms | images/s | p50 / ORT FP32 | eval Y-PSNR (dB) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['lr_size']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                  f"{r['images_per_s']:.2f} | {r['p50_vs_ort_fp32']:.2f} | {m['quality'][r['backend']]['psnr_y']:.3f} |"
                  for r in m["latency"]]
        lines.append("")
        for key, q in m["quantize"].items():
            if isinstance(q, dict):
                exact = (f" ({q['drop_db_exact_arithmetic']:.3f} dB with exact integer arithmetic, as on VNNI/AMX)"
                         if "drop_db_exact_arithmetic" in q else "")
                lines.append(f"- {q['model']}: holdout drop with every Conv INT8 {q['all_int8_drop_db']:.3f} dB, after "
                             f"the sensitivity step {q['drop_db']:.3f} dB{exact}; kept in float: "
                             f"{', '.join(q['float_layers']) or 'none'}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_student", "edsr_baseline"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="trained weights for model NAME; repeatable")
    parser.add_argument("--sizes", nargs="+", default=["320x180", "640x360"], help="LR sizes WxH")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS + EXTRA)
    parser.add_argument("--pause-pid", type=int, help="a process to SIGSTOP while timing (resumed after)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_cpu.json"))
    args = parser.parse_args()
    if "ort-cpu-fp32" not in args.backends:
        parser.error("--backends must include ort-cpu-fp32, the reference of the ratios")
    ok, why = openvino_status()
    if not ok and any(b.startswith("openvino") for b in args.backends):
        parser.error(why)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    cfg = load_config()  # the defaults: what `pipeline export` and `pipeline quantize` do
    cpu = cpu_info()
    report: dict[str, Any] = {
        "benchmark": "export_cpu", "command": " ".join(["python", *sys.argv]), "machine": cpu,
        "cpu_flags_checked": list(CPU_FLAGS), "int8_dot_product": int8_dot_product(cpu["flags"]),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"scale": SCALE, "batch": 1, "sizes": args.sizes, "warmup": args.warmup, "rounds": args.rounds,
                     "repeats": args.repeats, "quant": cfg.to_dict()["quant"]},
        "models": []}
    for name in args.models:
        torch.manual_seed(0)
        ckpt = checkpoints.get(name)
        model = (load_model(Path(ckpt), SCALE) if ckpt else create_model(name, scale=SCALE)).eval()
        log(f"{name}: {ckpt or 'random weights'}, {count_params(model):,} params")
        with tempfile.TemporaryDirectory(prefix="export-cpu-") as tmp:
            run = RunDir(tmp)
            student = save_checkpoint(run.path(stages.STUDENT), model)
            fp32, fp16 = stages.stage_export(cfg, run, student)
            stages.stage_quantize(cfg, run, fp32, fp16, progress=False)
            factories = backends(model, run.root, args.backends)
            entry = {"model": name, "weights": ckpt or "random-init (torch seed 0): PSNR meaningless",
                     "params": count_params(model), "quantize": json.loads(run.path(stages.QUANT_JSON).read_text()),
                     "quality": quality(factories)}
            with paused(args.pause_pid):
                load = os.getloadavg()[0]
                entry["latency"] = latency_rows(measure(factories, args.sizes, args), args.sizes)
                entry["load_avg_1min"] = [load, os.getloadavg()[0]]  # before and after timing: other work here
        report["models"].append(entry)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(args.out, report)
    md = markdown(report)
    write_text_atomic(args.out.with_suffix(".md"), md + "\n")
    print(md)


if __name__ == "__main__":
    main()
