"""Distillation cost on this CPU: step time per method (tiny preset) and peak extra memory of the contrastive loss.

    python benchmarks/distill_cpu.py --out benchmarks/results/distill_cpu.json

Step time: one full training step (student forward with taps, frozen teacher forward, loss, backward, Adam) on the
tiny preset's batch, median over timed steps after warm-up; the methods are interleaved step by step so that a
change of machine load hits all of them alike. Memory: peak resident memory added by one forward + backward of
`kernels.contrastive_loss` (C = 64, float32), each measurement in a fresh process whose peak (VmHWM) is reset after the
inputs exist.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from models import create_model
from pipeline.machine import cpu_info
from pipeline.config import METHODS, load_config
from pipeline.training.distill import make_loss
from pipeline.training.losses import Adaptors, tap_indices
from pipeline.rundir import versions, write_json_atomic
from pipeline.training.train import Trainee, batch_generator, load_train_patches


def step_times(warmup: int, timed: int) -> dict[str, dict[str, float]]:
    cfg = load_config()
    sampler = load_train_patches(cfg, progress=False)
    torch.manual_seed(0)
    teacher = create_model(cfg.model.teacher, scale=cfg.scale).eval().requires_grad_(False)
    teacher_taps = tap_indices(teacher.num_taps, cfg.distill.taps)
    setups = {}
    for method in METHODS:
        one = load_config(overrides=[f'distill.method="{method}"'])
        student = create_model(cfg.model.student, scale=cfg.scale)
        taps = tap_indices(student.num_taps, cfg.distill.taps) if method in ("fd", "facd", "facd-nogate") else []
        trainee = Trainee(student, taps, Adaptors(student.channels, teacher.channels, len(taps)) if taps else None)
        loss_fn = make_loss(one, None if method == "none" else teacher, teacher_taps)
        setups[method] = (trainee, loss_fn, torch.optim.Adam(trainee.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for it in range(warmup + timed):
        gen = batch_generator(0, it)
        lr, hr = sampler.sample(cfg.train.batch, gen)
        for method, (trainee, loss_fn, opt) in setups.items():
            tic = time.perf_counter()
            loss, _ = loss_fn(trainee, lr, hr, torch.Generator().manual_seed(it))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it >= warmup:
                times[method].append(time.perf_counter() - tic)
    base = statistics.median(times["none"])
    return {m: {"median_ms": 1e3 * statistics.median(t), "p10_ms": 1e3 * sorted(t)[len(t) // 10],
                "p90_ms": 1e3 * sorted(t)[(9 * len(t)) // 10], "vs_none": statistics.median(t) / base}
            for m, t in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(impl: str, n: int, channels: int = 64) -> dict[str, float]:
    import kernels

    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, channels, generator=g, requires_grad=True)
    t = torch.randn(n, channels, generator=g)
    kernels.contrastive_loss(s[:64], t[:64], tau=0.07, impl=impl).backward()  # load code paths before measuring
    s.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    base = _status_kib("VmRSS")
    tic = time.perf_counter()
    kernels.contrastive_loss(s, t, tau=0.07, impl=impl).backward()
    elapsed = time.perf_counter() - tic
    return {"impl": impl, "n": n, "extra_peak_mib": (_status_kib("VmHWM") - base) / 1024, "fwd_bwd_s": elapsed}


def memory_table(sizes: list[int]) -> list[dict[str, float]]:
    rows = []
    for n in sizes:
        for impl in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", impl, str(n)], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_cpu.json"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timed", type=int, default=30)
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return
    memory = memory_table([4096, 16384])
    by = {(r["impl"], r["n"]): r["extra_peak_mib"] for r in memory}
    report = {
        "cpu": cpu_info()["model"], "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "step_time_tiny_preset": step_times(args.warmup, args.timed),
        "contrastive_memory_c64_fp32": memory,
        "naive_over_chunked_memory": {n: by[("naive", n)] / max(by[("chunked", n)], 1e-9) for n in (4096, 16384)},
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
