"""Foundation benchmark: teacher training throughput, degrade time of a 2K image, and the teacher's PSNR vs bicubic.

    python benchmarks/bench.py --out bench.json [--run-dir runs/tiny]

Writes JSON with the CPU model beside every figure. The PSNR part reads `<run-dir>/eval.json` (run `make all` first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import create_model
from pipeline.config import load_config
from pipeline.data.imresize import degrade
from pipeline.machine import cpu_info
from pipeline.rundir import versions, write_json_atomic
from pipeline.training.train import batch_generator, load_train_patches


def bench_degrade(repeats: int = 5) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1356, 2040, 3), dtype=np.uint8)
    out = {}
    for scale in (2, 4):
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            degrade(img, scale)
            times.append(time.perf_counter() - tic)
        out[f"x{scale}_median_s"] = statistics.median(times)
    return {"image": "2040x1356 RGB uint8", **out}


def bench_training(iters: int = 30, warmup: int = 5) -> dict[str, Any]:
    cfg = load_config()
    torch.manual_seed(0)
    model = create_model(cfg.model.teacher, scale=cfg.scale)
    sampler = load_train_patches(cfg, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    tic = 0.0
    for it in range(warmup + iters):
        if it == warmup:
            tic = time.perf_counter()
        lr, hr = sampler.sample(cfg.train.batch, batch_generator(0, it))
        loss = torch.nn.functional.l1_loss(model(lr), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - tic
    return {"preset": cfg.model.teacher, "scale": cfg.scale, "batch": cfg.train.batch,
            "lr_patch": cfg.train.lr_patch, "iters_timed": iters, "torch_threads": torch.get_num_threads(),
            "patches_per_s": iters * cfg.train.batch / elapsed, "s_per_iter": elapsed / iters}


def teacher_vs_bicubic(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval.json"
    if not path.exists():
        return {"missing": f"{path} (run `make all` first)"}
    results = json.loads(path.read_text())
    return {r["model"]: {"data": r["data"], "scale": r["scale"], **r["mean"]} for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    args = parser.parse_args()
    report = {
        "cpu": cpu_info()["model"],
        "cores": torch.get_num_threads(),
        "versions": versions(),
        "degrade": bench_degrade(),
        "teacher_training": bench_training(),
        "teacher_vs_bicubic_y_psnr": teacher_vs_bicubic(args.run_dir),
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
