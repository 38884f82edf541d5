"""Deployment latency on this CPU: PyTorch FP32 eager against ONNX Runtime's CPU provider on the FP32, FP16 and INT8
(TensorRT-style QDQ) models that `pipeline export` and `pipeline quantize` make, batch 1, per student preset.

    python benchmarks/export_cpu.py [--models tiny_student edsr_baseline] [--sizes 320x180 640x360]
        [--checkpoint tiny_student=runs/tiny/student.pt] [--rounds 3] [--repeats 3] [--warmup 2]
        [--threads 0] [--out benchmarks/results/export_cpu.json]

Per model: export FP32 + FP16 ONNX into a temp dir (`export.export_fp32`, `export.to_fp16`), then calibrate and
quantize INT8 exactly as `stage_quantize` does with the default quant config (calibration_set("embedded-train", 4, 48,
48, 12, 0), percentile 99.99, sensitivity step down to max_drop_db 0.1 on the holdout). Then, in this one process, for
`--rounds` rounds, for each backend in turn: create the runner, activate it, for each LR size `--warmup` untimed and
`--repeats` timed `forward` calls, deactivate (one ONNX Runtime session alive at a time: an EDSR-baseline session at
640x360 holds GBs). Reported per backend and size: p50 / p95 over all timed calls of all rounds, images/s (1000 / p50)
and the p50 latency relative to ONNX Runtime FP32. Without `--checkpoint` the weights are random (seed 0): latency is
meaningful, the INT8 PSNR drops are not (the summary is then stored under `quantize_random_weights_latency_only`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from models import count_params, create_model
from pipeline import export, quantize
from pipeline.backends.ort_runner import OrtRunner
from pipeline.backends.torch_runner import TorchRunner
from pipeline.bench import cpu_model
from pipeline.config import parse_size
from pipeline.modelio import load_model
from pipeline.rundir import sha256_file, versions, write_json_atomic, write_text_atomic

SCALE = 4
# The default quant config (pipeline.config.QuantSection), as stage_quantize uses it.
QUANT = {"data": "embedded-train", "calib_count": 48, "calib_crop": 48, "calib_holdout": 12, "calib_seed": 0,
         "method": "percentile", "percentile": 99.99, "max_drop_db": 0.1}
BACKENDS = ("pytorch-fp32", "ort-cpu-fp32", "ort-cpu-fp16", "ort-cpu-int8")
REFERENCE = "ort-cpu-fp32"
FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "amx_tile")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("cpu family", "model", "stepping", "flags") and key not in info:
            info[key] = value.strip()
    flags = set(info.get("flags", "").split())
    return {"cpu": cpu_model(), "cpu_family": info.get("cpu family"), "cpu_model_number": info.get("model"),
            "stepping": info.get("stepping"), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "cpu_flags": {f: f in flags for f in FLAGS}}


def quant_summary(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"fp32_psnr_y": result["fp32_psnr_y"], "all_int8_drop_db": result["all_int8_drop_db"],
            "drop_db": result["drop_db"], "max_drop_db": result["max_drop_db"], "reached": result["reached"],
            "convs": len(result["layers"]), "int8_layers": len(result["int8_layers"]),
            "fp16_layers": result["fp16_layers"], "steps": result["steps"],
            "per_layer_cost_db": {r["layer"]: r["cost_db"] for r in result["layers"]},
            "method": result["method"], "calibration_crops": result["calibration"],
            "holdout_crops": result["holdout"], "seconds": seconds}


def build_models(model: torch.nn.Module, checkpoint: Path | None, tmp: Path, calib: dict[str, np.ndarray],
                 ) -> tuple[dict[str, Path], dict[str, Any], dict[str, Any]]:
    """FP32, FP16 and INT8 ONNX in `tmp`, made as `pipeline export` + `pipeline quantize` make them."""
    sha = sha256_file(checkpoint) if checkpoint else "random-init-seed-0"
    meta = export.model_meta(model, sha, "benchmarks/export_cpu.py")
    paths = {p: tmp / f"student.{p}.onnx" for p in ("fp32", "fp16", "int8")}
    tic = time.perf_counter()
    done = export.export_fp32(model, paths["fp32"], meta)
    export.save(export.to_fp16(onnx.load(str(paths["fp32"]))), paths["fp16"])
    log(f"  exported FP32 + FP16 in {time.perf_counter() - tic:.1f} s ({done['convs']} Convs, "
        f"simplifier {done['simplifier']}, opset {done['opset']})")
    tic = time.perf_counter()
    hold = calib["holdout"]
    amax = quantize.activation_amax(paths["fp32"], calib["lr"][~hold], QUANT["method"], QUANT["percentile"])
    fp16_proto = onnx.load(str(paths["fp16"]))
    result = quantize.choose_layers(paths["fp32"], fp16_proto, amax, calib["lr"][hold], calib["hr"][hold], SCALE,
                                    QUANT["max_drop_db"], progress=True)
    result.update(method=QUANT["method"], calibration=int((~hold).sum()), holdout=int(hold.sum()))
    proto = quantize.quantize(fp16_proto, amax, result["int8_layers"])
    broken = quantize.check_qdq(proto)
    if broken:
        raise RuntimeError("the INT8 model breaks the TensorRT QDQ rules:\n" + "\n".join(broken))
    export.save(proto, paths["int8"])
    summary = quant_summary(result, time.perf_counter() - tic)
    log(f"  quantized in {summary['seconds']:.1f} s: FP32 holdout {summary['fp32_psnr_y']:.3f} dB, all INT8 "
        f"drop {summary['all_int8_drop_db']:.3f} dB, chosen drop {summary['drop_db']:.3f} dB "
        f"({summary['int8_layers']}/{summary['convs']} Convs INT8, reached={summary['reached']})")
    files = {**done, "bytes": {p: path.stat().st_size for p, path in paths.items()}}
    return paths, files, summary


def measure(model: torch.nn.Module, paths: dict[str, Path], sizes: list[str], args: argparse.Namespace,
            ) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]]]:
    """Times in ms per backend and size, and the 1-minute load average after each backend's turn (noise check)."""
    factories = {"pytorch-fp32": lambda: TorchRunner(model),
                 "ort-cpu-fp32": lambda: OrtRunner(paths["fp32"], "cpu", args.threads),
                 "ort-cpu-fp16": lambda: OrtRunner(paths["fp16"], "cpu", args.threads),
                 "ort-cpu-int8": lambda: OrtRunner(paths["int8"], "cpu", args.threads)}
    inputs = {s: np.random.default_rng(0).random((1, 3, *parse_size(s)), dtype=np.float32) for s in sizes}
    times: dict[str, dict[str, list[float]]] = {b: {s: [] for s in sizes} for b in BACKENDS}
    load: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for backend in BACKENDS:
            tic = time.perf_counter()
            with factories[backend]() as runner:
                for size in sizes:
                    x = inputs[size]
                    for _ in range(args.warmup):
                        runner.forward(x)
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        runner.forward(x)
                        times[backend][size].append((time.perf_counter() - t0) * 1000)
            del runner
            gc.collect()
            load.append({"round": r + 1, "backend": backend, "loadavg_1min": round(os.getloadavg()[0], 2)})
            last = ", ".join(f"{s} {times[backend][s][-1]:.0f} ms" for s in sizes)
            log(f"  round {r + 1}/{args.rounds} {backend:13s} done in {time.perf_counter() - tic:6.1f} s "
                f"(last: {last}; load {load[-1]['loadavg_1min']})")
    return times, load


def rows(times: dict[str, dict[str, list[float]]], sizes: list[str]) -> list[dict[str, Any]]:
    out = []
    for size in sizes:
        ref = float(np.percentile(times[REFERENCE][size], 50))
        for backend in BACKENDS:
            t = times[backend][size]
            p50 = float(np.percentile(t, 50))
            out.append({"backend": backend, "lr_size": size, "batch": 1, "n": len(t), "p50_ms": p50,
                        "p95_ms": float(np.percentile(t, 95)), "min_ms": float(min(t)), "max_ms": float(max(t)),
                        "images_per_s": 1000 / p50, "p50_vs_ort_fp32": p50 / ref, "speedup_vs_ort_fp32": ref / p50,
                        "times_ms": [round(v, 2) for v in t]})
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(m["cpu_flags"])
    lines = [f"CPU: {m['cpu']} (family {m['cpu_family']} model {m['cpu_model_number']}), {m['logical_cpus']} logical "
             f"CPUs; flags: {flags}. onnxruntime {report['versions'].get('onnxruntime')}, torch "
             f"{report['versions'].get('torch')}, torch threads {report['threads']['torch']}, ORT intra-op threads "
             f"{report['threads']['ort_intra_op']}. Batch 1; {report['settings']['rounds']} rounds x "
             f"{report['settings']['repeats']} timed calls after {report['settings']['warmup']} warm-up calls.", ""]
    for entry in report["models"]:
        q = entry.get("quantize") or entry.get("quantize_random_weights_latency_only")
        lines += [f"### {entry['model']} ({entry['weights']}, {entry['params']:,} params)", "",
                  "| backend | LR size | p50 ms | p95 ms | images/s | p50 / ORT FP32 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['lr_size']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                  f"{r['images_per_s']:.2f} | {r['p50_vs_ort_fp32']:.2f} |" for r in entry["latency"]]
        note = "" if "quantize" in entry else " (random weights: drops meaningless for quality)"
        lines += ["", f"INT8{note}: FP32 holdout {q['fp32_psnr_y']:.3f} dB Y-PSNR; all Convs INT8 "
                      f"drop {q['all_int8_drop_db']:.3f} dB; after the sensitivity step drop {q['drop_db']:.3f} dB "
                      f"(target {q['max_drop_db']} dB {'reached' if q['reached'] else 'NOT reached'}); "
                      f"{q['int8_layers']}/{q['convs']} Convs INT8, FP16 kept: {', '.join(q['fp16_layers']) or 'none'}.",
                  ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_student", "edsr_baseline"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="trained weights for model NAME (pipeline.modelio.load_model); repeatable")
    parser.add_argument("--sizes", nargs="+", default=["320x180", "640x360"], help="LR sizes WxH")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_cpu.json"))
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default: --out with .md)")
    args = parser.parse_args()
    for s in args.sizes:
        parse_size(s, "--sizes")
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in args.models:
            parser.error(f"--checkpoint {item!r}: expected NAME=PATH with NAME one of --models")
        checkpoints[name] = Path(path)

    report: dict[str, Any] = {
        "benchmark": "export_cpu", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_at_start": os.getloadavg(), "machine": machine(), "versions": versions(),
        "threads": {"torch": torch.get_num_threads(), "ort_intra_op": args.threads or "0 (ORT default)"},
        "settings": {"scale": SCALE, "batch": 1, "sizes": args.sizes, "warmup": args.warmup, "rounds": args.rounds,
                     "repeats": args.repeats, "quant": QUANT, "input": "uniform random float32, rng seed 0"},
        "notes": ["Other processes (tests, pipeline runs) may have shared this CPU during the run: timings can carry "
                  "that noise; the backends are interleaved round by round so that it hits all of them alike.",
                  "The INT8 model is TensorRT-style: symmetric S8S8 QDQ on Conv inputs only, everything else FP16; "
                  "ONNX Runtime's CPU provider is not what it is built for.",
                  "Models without a checkpoint have random-initialised weights (torch seed 0): their PSNR and INT8 "
                  "drop numbers say nothing about quality (latency only) and are stored under "
                  "'quantize_random_weights_latency_only'."],
        "models": [],
    }
    log(f"machine: {report['machine']['cpu']}, flags {report['machine']['cpu_flags']}")
    calib = quantize.calibration_set(QUANT["data"], SCALE, QUANT["calib_count"], QUANT["calib_crop"],
                                     QUANT["calib_holdout"], QUANT["calib_seed"])
    for name in args.models:
        ckpt = checkpoints.get(name)
        torch.manual_seed(0)
        model = (load_model(ckpt, SCALE) if ckpt else create_model(name, scale=SCALE)).eval()
        log(f"{name}: {'weights ' + str(ckpt) if ckpt else 'random weights'}, {count_params(model):,} params")
        with tempfile.TemporaryDirectory(prefix="export-cpu-") as tmp:
            paths, files, summary = build_models(model, ckpt, Path(tmp), calib)
            times, load = measure(model, paths, args.sizes, args)
        entry = {"model": name, "weights": str(ckpt) if ckpt else "random-init (torch seed 0)",
                 "params": count_params(model), "onnx": files,
                 ("quantize" if ckpt else "quantize_random_weights_latency_only"): summary,
                 "latency": rows(times, args.sizes), "loadavg_during_timing": load}
        report["models"].append(entry)
        del model
        gc.collect()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["loadavg_at_end"] = os.getloadavg()
    write_json_atomic(args.out, report)
    md = markdown(report)
    write_text_atomic(args.md or args.out.with_suffix(".md"), md + "\n")
    print(md)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
