"""Latency budgets on this CPU: how long timing every candidate takes, and whether the student trained for each of
three budgets meets its budget and uses at least 80 % of it (ONNX Runtime CPU, INT8, 1280x720 output, x4).

    python benchmarks/budget_cpu.py table --work W            # pipeline budget (all candidates), wall time
    python benchmarks/budget_cpu.py train --work W --iters N  # pipeline all --budget-ms B for three budgets
    python benchmarks/budget_cpu.py gate --work W [--out benchmarks/results/budget_cpu.json]

`table` and `gate` are the latency measurements: run them on a quiet machine. The three budgets are spread over
the candidates' range: the p95 of the candidates at a quarter, half and three quarters of the list sorted by p95,
divided by 0.85 (so the candidate sits in the middle of the window [0.8, 0.9] x budget that the 10 % margin and the
80 % target leave) and rounded to 1 ms. Every `pipeline all` distils from the default teacher (the shipped one).
`gate` measures each trained student as `pipeline verify` does (pipeline.deploy.budget.latency_gate) and writes
the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from models import load_checkpoint
from pipeline.deploy import budget
from pipeline.rundir import BUDGET_JSON, LATENCY_JSON, versions, write_json_atomic

FRAME, BACKEND, PRECISION = "1280x720", "onnxruntime", "int8"
FAST_VERIFY = ["--set", 'verify.latency_sizes=["320x180"]', "--set", "verify.repeats=3"]


def pipeline(*args: str) -> int:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def budgets(table: dict) -> list[float]:
    rows = sorted(table["candidates"], key=lambda r: r["p95_ms"])
    return [float(round(rows[int(q * (len(rows) - 1))]["p95_ms"] / 0.85)) for q in (0.25, 0.5, 0.75)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["table", "train", "gate"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--method", default="facd", help="distill.method of the students")
    parser.add_argument("--only", type=float, nargs="+", help="train only these of the three budgets (ms)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_cpu.json"))
    args = parser.parse_args()
    table_path = args.work / "budget" / LATENCY_JSON
    if args.phase == "table":
        load = os.getloadavg()
        start = time.perf_counter()
        rc = pipeline("budget", "--frame", FRAME, "--backend", BACKEND, "--precision", PRECISION, "--out",
                      str(args.work / "budget"))
        wall = time.perf_counter() - start
        write_json_atomic(args.work / "table_run.json", {"rc": rc, "wall_s": wall, "loadavg_before": load,
                                                         "loadavg_after": os.getloadavg()})
        print(f"timing every candidate took {wall:.0f} s")
        return
    table = json.loads(table_path.read_text())
    if args.phase == "train":
        for b in budgets(table):
            run = args.work / f"budget{b:g}ms"
            if args.only and b not in args.only:
                continue
            pipeline("all", "--budget-ms", f"{b:g}", "--frame", FRAME, "--latency-table", str(table_path),
                     "--run-dir", str(run), "--set", f"train.iters={args.iters}", "--set",
                     f'distill.method="{args.method}"', *FAST_VERIFY)
        return
    rows = []
    load = os.getloadavg()
    for b in budgets(table):
        run = args.work / f"budget{b:g}ms"
        if not (run / "report.json").exists():
            rows.append({"budget_ms": b, "not_run": f"no finished `pipeline all` in {run}"})
            continue
        checkpoint = load_checkpoint(run / "student.pt")
        config = checkpoint["config"]
        gate = budget.latency_gate(run, checkpoint)
        choice = json.loads((run / "budget" / BUDGET_JSON).read_text())["choice"]
        evals = json.loads((run / "eval.json").read_text())
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
        int8 = next((r for r in report.get("rows", []) if r["backend"] == "onnxruntime-cpu"
                     and r["precision"] == "int8-cpu"), {})
        rows.append({"budget_ms": b, "choice": choice, "train_iters": config["train"]["iters"],
                     "distill_method": config["distill"]["method"],
                     "trained_p50_ms": gate["p50_ms"], "trained_p95_ms": gate["p95_ms"],
                     "used": gate["p95_ms"] / b, "within_budget": gate["p95_ms"] <= b,
                     "at_least_80_percent": gate["p95_ms"] >= 0.8 * b,
                     "psnr_y_pytorch": evals[2]["mean"]["psnr_y"], "psnr_y_int8_cpu": int8.get("psnr_y"),
                     "bicubic_psnr_y": evals[0]["mean"]["psnr_y"], "run": str(run)})
        print(f"budget {b:g} ms: {choice['name']} (probe p95 {choice['p95_ms']:.1f} ms), trained p95 "
              f"{gate['p95_ms']:.1f} ms = {100 * gate['p95_ms'] / b:.0f}% of the budget")
    table_run = json.loads((args.work / "table_run.json").read_text())
    write_json_atomic(args.out, {
        "machine": table["machine"], "versions": versions(), "frame": FRAME, "backend": table["runner"],
        "precision": PRECISION, "candidates": len(table["candidates"]),
        "timing_all_candidates": {**table_run, "export_and_recipe_s": table.get("made_in_s"),
                                  "target_s": 180, "met": table_run["wall_s"] <= 180},
        "table": table["candidates"], "budgets": rows, "loadavg_during_gate": [load, os.getloadavg()],
        "command": "python benchmarks/budget_cpu.py table|train|gate --work W"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
