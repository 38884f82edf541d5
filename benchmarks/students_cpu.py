"""The student families side by side on this CPU: for every trained candidate (benchmarks/students_cpu.sh), the
pipeline's own stages (export, quantize with every Conv INT8, verify for the eval-set rows), then latency and one table.

    python benchmarks/students_cpu.py --runs runs/students --out benchmarks/results/students_cpu_eval24

Per candidate and seed: validation-split Y-PSNR (where the default is chosen), eval-set Y-PSNR of PyTorch FP32 and
of the all-INT8 CPU model on ONNX Runtime and OpenVINO (verify's rows), and the all-INT8 drop on the calibration
hold-out (quant.json). Per candidate (its first seed's models; the weights do not change the time): latency at LR
640x360 (x4: a 2560x1440 output) on ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8, one forward call at batch 1,
p50 of 10 after 2 warm-up calls, with the peak memory added (verify's PeakRss); the teacher's ONNX Runtime FP32
latency the same way (p50 of 5). Each candidate is compared with `tiny_student`, paired per seed and image
(seed-level t interval and the study's bootstrap), and checked against the targets: at least 15x faster than the
teacher on ONNX Runtime FP32, at least half the teacher's gain over bicubic. Run it on an otherwise idle machine
(wall-clock latency). Writes `<out>.json` and `<out>.md`.

`--latency-only` times each student shape on this machine without the quality columns: any one run directory per
shape will do (e.g. the minute-long `<preset>+none-seed0` runs), since the weights do not change the time.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from models import count_flops, count_params
from pipeline.backends.base import latency
from pipeline.backends.ort_runner import OrtRunner
from pipeline.cli import main as pipeline
from pipeline.config import load_config
from pipeline.convert.export import export_fp32, model_meta
from pipeline.evaluation.evaluate import eval_models, validation_split
from pipeline.machine import machine
from pipeline.modelio import load_model
from pipeline.rundir import ONNX, QUANT_JSON, REPORT_JSON, STUDENT, versions, write_json_atomic, write_text_atomic
from pipeline.training import study
from pipeline.training.teachers import shipped_teacher

LR = "640x360"
BASELINE = "tiny_student"
ROWS = {"ort_fp32": ("onnxruntime-cpu", "fp32"), "ort_int8": ("onnxruntime-cpu", "int8-cpu"),
        "ov_fp32": ("openvino", "fp32"), "ov_int8": ("openvino", "int8-cpu")}


FAST_VERIFY = ["--set", 'verify.latency_sizes=["40x24"]', "--set", "verify.repeats=2", "--set", "verify.warmup=0"]


def stages(run: Path, preset: str) -> None:
    """export, quantize (every Conv INT8: max_drop_db so large that no Conv is kept in float) and verify (its
    eval-set rows; latency is measured apart)."""
    student = ["--set", f'model.student="{preset}"']
    for args in (["export"], ["quantize", "--set", "quant.max_drop_db=100"], ["verify", *FAST_VERIFY]):
        code = pipeline(["-q", args[0], "--run-dir", str(run), *student, *args[1:]])
        if code not in (0, 1):  # 1: a gate failed, the report is written
            raise SystemExit(f"pipeline {args[0]} --run-dir {run} exited with {code}")


def candidate(run: Path, val: Any) -> dict[str, Any]:
    report = json.loads((run / REPORT_JSON).read_text())
    quant = json.loads((run / QUANT_JSON).read_text())
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    ref = rows[("pytorch", "fp32")]
    out: dict[str, Any] = {"psnr_y": ref["psnr_y"], "per_image": [r["psnr_y"] for r in ref["per_image"]],
                           "int8_all_holdout_drop_db": quant["cpu"]["all_int8_drop_db"]}
    for key, row_key in (("ort_int8", ("onnxruntime-cpu", "int8-cpu")), ("ov_int8", ("openvino", "int8-cpu"))):
        out[f"{key}_psnr_y"] = rows[row_key]["psnr_y"]
    out["int8_all_eval_drop_db"] = out["psnr_y"] - out["ort_int8_psnr_y"]
    cfg = load_config()
    out["val_psnr_y"] = eval_models(cfg, {"s": run / STUDENT}, progress=False, data=val)[1]["mean"]["psnr_y"]
    return out


def latencies(run: Path) -> dict[str, Any]:
    """The four CPU rows of one run's models at LR, with the peak memory each adds."""
    from pipeline.backends.openvino_runner import OpenVinoRunner
    from pipeline.evaluation.verify import PeakRss

    makers = {"ort_fp32": lambda: OrtRunner(run / ONNX["fp32"], "cpu"),
              "ort_int8": lambda: OrtRunner(run / ONNX["int8-cpu"], "cpu"),
              "ov_fp32": lambda: OpenVinoRunner(run / ONNX["fp32"]),
              "ov_int8": lambda: OpenVinoRunner(run / ONNX["int8-cpu"])}
    out = {}
    for key, make in makers.items():
        with PeakRss() as rss, make() as runner:
            timing = latency(runner, LR, warmup=2, repeats=10)
        out[key] = {"p50_ms": timing["p50_ms"], "p95_ms": timing["p95_ms"], "peak_mem_mb": rss.peak_mb}
    return out


def shape_and_speed(run: Path, scale: int, teacher_ms: float) -> dict[str, Any]:
    """The columns that depend on the student's shape only: size, latency on this machine and its ratios."""
    model = load_model(run / STUDENT, scale)
    timed = latencies(run)
    print(f"{run.name}: " + ", ".join(f"{k} {v['p50_ms']:.0f} ms" for k, v in timed.items()), flush=True)
    fp32 = timed["ort_fp32"]["p50_ms"]
    best_fp32 = min(timed[k]["p50_ms"] for k in ("ort_fp32", "ov_fp32"))
    best_int8 = min(timed[k]["p50_ms"] for k in ("ort_int8", "ov_int8"))
    return {"model": model.config, "params": count_params(model), "gflops": count_flops(model, (360, 640)) / 1e9,
            "latency": timed, "latency_from": run.name, "speedup_vs_teacher_ort_fp32": teacher_ms / fp32,
            "ort_int8_over_ort_fp32": timed["ort_int8"]["p50_ms"] / fp32, "best_int8_over_ort_fp32": best_int8 / fp32,
            "best_int8_over_best_fp32": best_int8 / best_fp32}


def paired(by_preset: dict[str, dict[int, dict[str, Any]]], name: str, baseline: str) -> dict[str, Any] | None:
    """`name` - `baseline` on their common seeds, paired per seed and image: the study's bootstrap and a seed-level
    t interval; None with fewer than 2 common seeds."""
    seeds = sorted(set(by_preset[name]) & set(by_preset[baseline]))
    if len(seeds) < 2:
        return None
    psnr = {p: np.array([by_preset[p][k]["per_image"] for k in seeds]) for p in (baseline, name)}
    return {**study.compare(psnr, baseline)[1], "seeds": seeds}


def teacher_latency(scale: int) -> dict[str, Any]:
    teacher = load_model(shipped_teacher("edsr_baseline", scale), scale)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.onnx"
        export_fp32(teacher, path, model_meta(teacher, "", ""))
        with OrtRunner(path, "cpu") as runner:
            timing = latency(runner, LR, warmup=1, repeats=5)
    return {"params": count_params(teacher), "gflops": count_flops(teacher, (360, 640)) / 1e9,
            "ort_fp32_p50_ms": timing["p50_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/students"), help="<preset>-seed<k>/ run directories")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/students_cpu"), help="<out>.json, <out>.md")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--skip-stages", action="store_true", help="only read the reports (the stages ran before)")
    p.add_argument("--latency-only", action="store_true", help="time one run per student shape, no quality columns")
    args = p.parse_args(argv)
    cfg = load_config()
    start = time.perf_counter()
    runs: dict[str, dict[int, Path]] = {}
    for d in sorted(args.runs.iterdir()):
        if re.fullmatch(r".+-seed\d+", d.name) and (d / STUDENT).is_file():
            label, seed = d.name.rsplit("-seed", 1)  # label: <preset> (the recipe's method) or <preset>+<method>
            runs.setdefault(label, {})[int(seed)] = d
    if args.latency_only:
        return latency_table(runs, args, cfg.scale, start)
    by_preset: dict[str, dict[int, dict[str, Any]]] = {}
    val = validation_split(cfg)
    for label, per_seed in runs.items():
        preset = label.split("+")[0]
        for seed in args.seeds:
            run = per_seed.get(seed)
            if run is None:
                print(f"{label}: no seed {seed} in {args.runs}; compared on the seeds it has", flush=True)
                continue
            if not args.skip_stages:
                stages(run, preset)
            by_preset.setdefault(label, {})[seed] = candidate(run, val)
            print(f"{run.name}: {by_preset[label][seed]['psnr_y']:.3f} dB", flush=True)
    fixed = eval_models(cfg, {"teacher": shipped_teacher(cfg.model.teacher, cfg.scale)}, progress=False)
    bicubic, teacher_psnr = fixed[0]["mean"]["psnr_y"], fixed[1]["mean"]["psnr_y"]
    teacher = {**teacher_latency(cfg.scale), "psnr_y": teacher_psnr}
    pairs = {name: paired(by_preset, name, BASELINE) for name in by_preset if name != BASELINE}
    # A method against the same preset distilled with the recipe's: does the teacher pay off for this student?
    recipe_pairs = {name: paired(by_preset, name.split("+")[0], name) for name in by_preset
                  if "+" in name and name.split("+")[0] in by_preset}
    table = []
    for preset, per_seed in by_preset.items():
        val_mean = float(np.mean([r["val_psnr_y"] for r in per_seed.values()]))
        if "+" in preset:  # the same shape as its recipe row: timed there
            table.append({"preset": preset, "per_seed": per_seed, "psnr_y_mean": float(np.mean(
                [r["psnr_y"] for r in per_seed.values()])), "val_psnr_y_mean": val_mean,
                "recipe_minus_this": recipe_pairs.get(preset)})
            continue
        shape = shape_and_speed(runs[preset][min(runs[preset])], cfg.scale, teacher["ort_fp32_p50_ms"])
        mean = float(np.mean([r["psnr_y"] for r in per_seed.values()]))
        share = (mean - bicubic) / (teacher_psnr - bicubic)
        int8 = [r for r in per_seed.values() if "int8_all_eval_drop_db" in r]
        table.append({"preset": preset, **shape, "psnr_y_mean": mean, "val_psnr_y_mean": val_mean,
                      "share_of_teacher_gain": share,
                      "int8_all_eval_drop_db": float(np.mean([r["int8_all_eval_drop_db"] for r in int8])),
                      "int8_all_holdout_drop_db": float(np.mean([r["int8_all_holdout_drop_db"] for r in int8])),
                      "int8_seeds": [k for k, r in per_seed.items() if "int8_all_eval_drop_db" in r],
                      "meets_15x": shape["speedup_vs_teacher_ort_fp32"] >= 15, "meets_half_gain": share >= 0.5,
                      "vs_tiny_student": pairs.get(preset), "per_seed": per_seed})
    result = {"machine": machine(), "versions": versions(), "lr_size": LR, "scale": cfg.scale, "seeds": args.seeds,
              "recipe": f"pipeline all's: {cfg.distill.method}, {cfg.train.iters} iterations, from the shipped "
                        f"{cfg.model.teacher}", "method": cfg.distill.method,
              "bicubic_psnr_y": bicubic, "teacher": teacher, "candidates": table,
              "measured_in_s": time.perf_counter() - start}
    write_json_atomic(args.out.with_suffix(".json"), result)
    write_text_atomic(args.out.with_suffix(".md"), format_table(result))
    print(format_table(result))
    return 0


def latency_table(runs: dict[str, dict[int, Path]], args: argparse.Namespace, scale: int, start: float) -> int:
    """`--latency-only`: the four CPU rows of each student shape, against the teacher, on this machine."""
    first_run = {}
    for label, per_seed in sorted(runs.items()):
        first_run.setdefault(label.split("+")[0], per_seed[min(per_seed)])
    teacher = teacher_latency(scale)
    table = []
    for preset, run in first_run.items():
        if not args.skip_stages:
            stages(run, preset)
        table.append({"preset": preset, **shape_and_speed(run, scale, teacher["ort_fp32_p50_ms"])})
    result = {"machine": machine(), "versions": versions(), "lr_size": LR, "scale": scale, "teacher": teacher,
              "candidates": table, "measured_in_s": time.perf_counter() - start}
    m = result["machine"]
    lines = [f"Student shapes at LR {LR} (x{scale}), latency only; teacher ONNX Runtime FP32 "
             f"{teacher['ort_fp32_p50_ms']:.0f} ms.", "",
             "| student | params | GFLOPs | x faster than teacher | ORT FP32 / INT8 ms | OV FP32 / INT8 ms | "
             "ORT INT8 / ORT FP32 | best INT8 / ORT FP32 | best INT8 / best FP32 | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(table, key=lambda c: c["gflops"]):
        lat = c["latency"]
        lines.append(f"| {c['preset']} | {c['params']:,} | {c['gflops']:.1f} | "
                     f"{c['speedup_vs_teacher_ort_fp32']:.1f} | "
                     f"{lat['ort_fp32']['p50_ms']:.0f} / {lat['ort_int8']['p50_ms']:.0f} | "
                     f"{lat['ov_fp32']['p50_ms']:.0f} / {lat['ov_int8']['p50_ms']:.0f} | "
                     f"{c['ort_int8_over_ort_fp32']:.2f} | {c['best_int8_over_ort_fp32']:.2f} | "
                     f"{c['best_int8_over_best_fp32']:.2f} | {lat['ort_fp32']['peak_mem_mb']:.0f} |")
    flags = ", ".join(m["cpu_flags"]) or "none of AVX-512/VNNI/AMX"
    lines.append(f"\nCPU {m['cpu']} ({m['cores']} cores; flags {flags}). Latency: one forward call at batch 1, p50 of "
                 "10 after 2 warm-up calls (teacher: 5 after 1); INT8: every Conv INT8; peak MB: resident memory "
                 "added, ONNX Runtime FP32.")
    write_json_atomic(args.out.with_suffix(".json"), result)
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def format_table(result: dict[str, Any]) -> str:
    t, m = result["teacher"], result["machine"]
    lines = [f"Students at LR {result['lr_size']} (x{result['scale']}), {result['recipe']}; eval set, Y-PSNR, seeds "
             f"{', '.join(map(str, result['seeds']))}. Bicubic {result['bicubic_psnr_y']:.3f} dB, teacher "
             f"{t['psnr_y']:.3f} dB; teacher ONNX Runtime FP32 {t['ort_fp32_p50_ms']:.0f} ms.", "",
             "| student | params | GFLOPs | validation Y-PSNR | Y-PSNR mean (per seed) | vs tiny_student: seed-t 95 % "
             "(bootstrap) | share of gain | x faster | ORT FP32 / INT8 ms | OV FP32 / INT8 ms | "
             "all-INT8 drop eval / holdout | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    timed = [c for c in result["candidates"] if "latency" in c]
    for c in sorted(timed, key=lambda c: c["gflops"]):
        lat = c["latency"]
        seeds = ", ".join(f"{r['psnr_y']:.3f}" for r in c["per_seed"].values())
        pair = c["vs_tiny_student"] or {}
        vs = "" if "diff" not in pair else (f"{pair['diff']:+.3f} [{pair['t_low']:+.3f}, {pair['t_high']:+.3f}] "
                                            f"([{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}])")
        lines.append(f"| {c['preset']} | {c['params']:,} | {c['gflops']:.1f} | {c['val_psnr_y_mean']:.3f} | "
                     f"{c['psnr_y_mean']:.3f} ({seeds}) | "
                     f"{vs} | {c['share_of_teacher_gain']:.0%} | {c['speedup_vs_teacher_ort_fp32']:.1f} | "
                     f"{lat['ort_fp32']['p50_ms']:.0f} / {lat['ort_int8']['p50_ms']:.0f} | "
                     f"{lat['ov_fp32']['p50_ms']:.0f} / {lat['ov_int8']['p50_ms']:.0f} | "
                     f"{c['int8_all_eval_drop_db']:.3f} / {c['int8_all_holdout_drop_db']:.3f} "
                     f"(seeds {', '.join(map(str, c['int8_seeds']))}) | {lat['ort_fp32']['peak_mem_mb']:.0f} |")
    for c in result["candidates"]:
        if "latency" in c:
            continue
        preset, method = c["preset"].split("+")
        seeds = ", ".join(f"{r['psnr_y']:.3f}" for r in c["per_seed"].values())
        pair = c["recipe_minus_this"] or {}
        vs = "" if "diff" not in pair else (f"; {result['method']} - {method}: {pair['diff']:+.3f} dB, seed-t 95 % "
                                            f"[{pair['t_low']:+.3f}, {pair['t_high']:+.3f}] (bootstrap "
                                            f"[{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}])")
        share = (c["psnr_y_mean"] - result["bicubic_psnr_y"]) / (t["psnr_y"] - result["bicubic_psnr_y"])
        lines.append(f"\n{preset} trained with `{method}` (same iterations, seeds, data; no teacher): "
                     f"{c['psnr_y_mean']:.3f} dB ({seeds}), {share:.0%} of the teacher's gain; validation "
                     f"{c['val_psnr_y_mean']:.3f} dB{vs}.")
    flags = ", ".join(m["cpu_flags"]) or "none of AVX-512/VNNI/AMX"
    lines.append(f"\nCPU {m['cpu']} ({m['cores']} cores; flags {flags}). Latency: one forward call at batch 1, p50 of "
                 "10 after 2 warm-up calls, on one seed's models; peak MB: resident memory added, ONNX Runtime FP32. "
                 "Validation: the 10 images no training stage saw (`data.val_count` + `data.val`), mean over seeds.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
