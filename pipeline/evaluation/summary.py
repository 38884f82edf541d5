"""Teacher against student in one table: parameters, FLOPs, eval-set Y-PSNR and latency (the end of `pipeline all`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models import count_flops, count_params
from pipeline.backends.base import latency
from pipeline.backends.torch_runner import TorchRunner
from pipeline.config import parse_size
from pipeline.modelio import load_model

SUMMARY_LR = "320x180"  # LR size of the summary's FLOPs and latency


def teacher_vs_student(scale: int, teacher: Path, student: Path, evals: list[dict[str, Any]]) -> dict[str, Any]:
    """`evals` is eval.json (bicubic, teacher, student); latency is PyTorch FP32 on this CPU, batch 1."""
    bicubic = evals[0]["mean"]["psnr_y"]
    rows = {}
    for role, path, result in (("teacher", teacher, evals[1]), ("student", student, evals[2])):
        model = load_model(path, scale)
        with TorchRunner(model) as runner:
            timing = latency(runner, SUMMARY_LR, warmup=1, repeats=3)
        rows[role] = {"file": str(path), "model": model.config, "params": count_params(model),
                      "gflops": count_flops(model, parse_size(SUMMARY_LR)) / 1e9, "psnr_y": result["mean"]["psnr_y"],
                      "latency_ms": timing["p50_ms"]}
    t, s = rows["teacher"], rows["student"]
    gain = t["psnr_y"] - bicubic
    return {"backend": f"pytorch-fp32 cpu, LR {SUMMARY_LR}, batch 1, p50 of 3", "bicubic_psnr_y": bicubic, **rows,
            "student_share_of_teacher_gain": (s["psnr_y"] - bicubic) / gain if gain > 0 else None}


def format_summary(summary: dict[str, Any], data: str) -> str:
    t, s, bicubic = summary["teacher"], summary["student"], summary["bicubic_psnr_y"]
    share = summary["student_share_of_teacher_gain"]
    return "\n".join([
        f"| {data} | teacher | student | teacher / student |", "|---|---|---|---|",
        f"| parameters | {t['params']:,} | {s['params']:,} | {t['params'] / s['params']:.1f}x |",
        f"| GFLOPs at LR {SUMMARY_LR} | {t['gflops']:.1f} | {s['gflops']:.1f} | {t['gflops'] / s['gflops']:.1f}x |",
        f"| Y-PSNR (dB; bicubic {bicubic:.3f}) | {t['psnr_y']:.3f} | {s['psnr_y']:.3f} | "
        f"{t['psnr_y'] - s['psnr_y']:+.3f} dB |",
        f"| latency, {summary['backend']} | {t['latency_ms']:.0f} ms | {s['latency_ms']:.0f} ms | "
        f"{t['latency_ms'] / s['latency_ms']:.1f}x |",
        "", "the student recovers " + (f"{share:.0%}" if share is not None else "n/a (the teacher does not beat "
                                       "bicubic)") + " of the teacher's gain over bicubic"])
