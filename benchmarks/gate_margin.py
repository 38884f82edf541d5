"""The gate margin that would close a given share of the patches (issue: the study a user would trust, the gate).

FACD distils a patch only where the teacher's advantage PSNR(SR_T) - PSNR(SR_S) exceeds `distill.gate_margin` dB
(pipeline/training/losses.py, `adaptive_gate`). At margin 0 the gate of a trained student is open on nearly every
patch, so the adaptive part does nothing. For each run's final student this draws patches the way training does
(random crops with flips and rotations of the training images) and the validation split's, measures every patch's
teacher advantage, and prints its quantiles: the `--close` quantile is the margin that closes that share.

    python benchmarks/gate_margin.py runs/matched24/facd-i600-seed0 runs/students24/anchor_m-seed{0,1,2} \
        --out benchmarks/results/gate_margin_anchor_m.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.datasets import PatchSampler, train_and_validation
from pipeline.machine import machine
from pipeline.modelio import load_model
from pipeline.rundir import STUDENT, load_manifest, write_json_atomic
from pipeline.training.losses import patch_psnr
from pipeline.training.teachers import shipped_teacher

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def advantages(student: torch.nn.Module, teacher: torch.nn.Module, sampler: PatchSampler, patches: int,
               seed: int) -> np.ndarray:
    """The teacher's per-patch advantage (dB, RGB, as the gate computes it) on `patches` patches of `sampler`."""
    gen, out = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(0, patches, 64):
            lr, hr = sampler.sample(64, gen)
            out.append((patch_psnr(teacher(lr), hr) - patch_psnr(student(lr), hr)).numpy())
    return np.concatenate(out)[:patches]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders holding student.pt (the distill stage's output)")
    p.add_argument("--close", type=float, default=0.25, help="share of the patches the margin should close")
    p.add_argument("--patches", type=int, default=1024, help="patches drawn per split")
    p.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    cfg = load_config()  # the data and teacher of the config's defaults, as benchmarks/matched_cpu.sh trains
    train, val = train_and_validation(cfg.data.train, cfg.data.val_count, cfg.data.val, cfg.scale)
    samplers = {split: PatchSampler(list(pairs), cfg.train.lr_patch, cfg.scale)
                for split, pairs in (("train", train), ("val", val))}
    teacher = load_model(shipped_teacher(cfg.model.teacher, cfg.scale), cfg.scale).eval()
    result = {"machine": machine(), "teacher": cfg.model.teacher, "close": args.close, "patches": args.patches,
              "runs": []}
    for run in args.runs:
        config = load_manifest(run / "manifest.json")["artifacts"][STUDENT]["config"]
        student = load_model(run / STUDENT, cfg.scale).eval()
        row = {"run": str(run), "method": config["distill"]["method"], "seed": config["seed"]}
        for split, sampler in samplers.items():
            adv = advantages(student, teacher, sampler, args.patches, seed=1)
            row[split] = {"open_at_0": float((adv > 0).mean()), "mean_db": float(adv.mean()),
                          "quantiles_db": {f"{q:g}": float(np.quantile(adv, q)) for q in QUANTILES},
                          "margin_to_close_db": float(np.quantile(adv, args.close))}
        result["runs"].append(row)
        print(f"{run}: " + "; ".join(
            f"{split} open at 0 dB {row[split]['open_at_0']:.3f}, mean advantage {row[split]['mean_db']:.3f} dB, "
            f"margin closing {args.close:.0%} {row[split]['margin_to_close_db']:.3f} dB" for split in ("train", "val")))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
