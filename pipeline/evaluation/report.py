"""The human report of `pipeline verify`: report.md with its tables and verdict, and three charts beside it.

    psnr.png     Y-PSNR per backend x precision, zoomed around the values, with the reference and bicubic marked
    latency.png  p50 latency per LR size (error bar up to p95), one bar per backend x precision
    crops.png    the same crop of one eval image from bicubic, every backend and HR

The caller writes report.json from the same dict; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.plots import pyplot, save_figure
from pipeline.rundir import REPORT_FILES, write_text_atomic

ROW_COLUMNS = ("backend", "precision", "status", "Y-PSNR", "Y-SSIM", "delta dB", "vs-reference dB", "gate dB",
               "reason")
THROUGHPUT_COLUMNS = ("backend", "precision", "LR size", "p50 ms", "p95 ms", "images/s", "peak MB")
CROPS_PER_ROW = 4
LOG_SCALE_SPREAD = 20.0


def write_report(out_dir: Path, report: dict, crops: list[tuple[str, np.ndarray]]) -> list[Path]:
    """Write report.md, psnr.png, latency.png, crops.png into out_dir; return the paths written.

    report.json is written by the caller.
    """
    paths = [out_dir / name for name in REPORT_FILES]
    write_text_atomic(paths[0], _markdown(report))
    _plot_psnr(paths[1], report)
    _plot_latency(paths[2], report)
    _plot_crops(paths[3], crops)
    return paths


def format_rows(report: dict) -> str:
    """The markdown table of report["rows"] (also printed on the console by the caller)."""
    return _table(ROW_COLUMNS, [
        [r["backend"], r["precision"], r["status"], _num(r["psnr_y"]), _num(r["ssim_y"], 4), _num(r["delta_db"]),
         _num(r["psnr_vs_reference"]), _num(r["gate_db"]), r["reason"]]
        for r in report["rows"]
    ])


def format_budget(report: dict) -> str:
    """The latency budget's table (report["latency_budget"]): budget, the chosen shape, the trained student's
    measured latency on the budget's runner, and that runner's Y-PSNR row."""
    g = report["latency_budget"]
    s = g["student"]
    row = next((r for r in report["rows"] if f"{r['backend']}-{r['precision']}" == g.get("runner")), None)
    used = f"{100 * g['used']:.0f}%" if g.get("used") is not None else "-"
    runner = g.get("runner") or f"{g['backend']} {g['precision']}"
    return _table(("budget ms", "frame", "runner", "student", "p50 ms", "p95 ms", "used", "Y-PSNR", "status",
                   "reason"), [[f"{g['budget_ms']:g}", g["frame"], runner,
                                f"{s['preset']} {s['blocks']} blocks x {s['channels']} channels",
                                _num(g["p50_ms"], 1), _num(g["p95_ms"], 1), used,
                                _num(row["psnr_y"] if row else None), g["status"], g["reason"]]])


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    """A markdown table padded to aligned columns, so it also reads well on the console."""
    cells = [list(header)] + [[" ".join(c.replace("|", "\\|").split()) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> str:
    return f"{row['backend']} {row['precision']}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _markdown(report: dict) -> str:
    machine, bicubic = report["machine"], report["bicubic"]
    throughput = [[r["backend"], r["precision"], t["lr_size"], _num(t["p50_ms"], 2), _num(t["p95_ms"], 2),
                   _num(t["images_per_s"], 2), _num(t["peak_mem_mb"], 1)]
                  for r in report["rows"] for t in r["throughput"]]
    failing = [r for r in report["rows"] if r["status"] == "fail"]
    gates = ", ".join(f"{p} {g}" for p, g in report["gates"].items())
    lines = [
        f"# Verification report: x{report['scale']} student",
        "",
        f"- Machine: CPU {machine['cpu']}; GPU {machine['gpu'] or 'none'}",
        f"- Data: {report['data']}, scale x{report['scale']}, created {report['created']}",
        f"- Bicubic: Y-PSNR {_num(bicubic['psnr_y'])} dB, Y-SSIM {_num(bicubic['ssim_y'], 4)}",
        f"- Gates (max |delta dB| vs the reference row): {gates}",
        "",
        "## Accuracy",
        "",
        format_rows(report),
        "",
        *(["## Latency budget", "", format_budget(report), ""] if "latency_budget" in report else []),
        "## Throughput",
        "",
        _table(THROUGHPUT_COLUMNS, throughput) if throughput else "Not measured.",
        "",
        "## Verdict",
        "",
        "**PASS**" if report["passed"] else "**FAIL**",
    ]
    if failing:
        lines += [""] + [f"- {_label(r)} ({r['model']}): {r['reason']}" for r in failing]
    lines += ["", "## Charts", "", "![Y-PSNR](psnr.png)", "", "![Latency](latency.png)", "", "![Crops](crops.png)",
              ""]
    return "\n".join(lines)


def _save_message(path: Path, title: str, message: str) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 2))
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="grey", transform=ax.transAxes)
    ax.set_axis_off()
    save_figure(fig, path)


def _plot_psnr(path: Path, report: dict) -> None:
    rows = report["rows"]
    values = [r["psnr_y"] for r in rows if _finite(r["psnr_y"])]
    if not values:
        _save_message(path, "Y-PSNR", "no results")
        return
    from matplotlib.patches import Patch

    plt = pyplot()
    reference, bicubic = rows[0]["psnr_y"], report["bicubic"]["psnr_y"]
    marks = [v for v in (reference, bicubic) if _finite(v)]
    lo, hi = min(values + marks), max(values + marks)
    pad = max(0.15 * (hi - lo), 0.02)
    # Bars start off-axis on purpose: the differences are hundredths of a dB, invisible on an axis from 0.
    left, right = lo - pad, hi + pad + 0.4 * (hi - lo + 2 * pad)

    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(rows)))
    for i, r in enumerate(rows):
        if not _finite(r["psnr_y"]):
            ax.text(left, i, f" {r['status']}", va="center", color="grey")
            continue
        ax.barh(i, r["psnr_y"], color="tab:red" if r["status"] == "fail" else "tab:blue", height=0.6)
        delta = f" ({r['delta_db']:+.3f})" if _finite(r["delta_db"]) else ""
        ax.text(right, i, f"{r['psnr_y']:.3f}{delta} ", ha="right", va="center", fontsize="small")
    handles = [Patch(color="tab:blue", label="pass"), Patch(color="tab:red", label="fail")]
    if _finite(reference):
        handles.append(ax.axvline(reference, color="black", linestyle="--", label=f"reference {reference:.3f}"))
    if _finite(bicubic):
        handles.append(ax.axvline(bicubic, color="grey", linestyle=":", label=f"bicubic {bicubic:.3f}"))
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
    for tick, r in zip(ax.get_yticklabels(), rows):
        if not _finite(r["psnr_y"]):
            tick.set_color("grey")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_xlim(left, right)
    ax.set_xlabel("Y-PSNR dB (right: value and delta vs reference)")
    ax.set_title(f"Y-PSNR, x{report['scale']}, {report['data']}")
    ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
    save_figure(fig, path)


def _plot_latency(path: Path, report: dict) -> None:
    series = [r for r in report["rows"] if r["throughput"]]
    if not series:
        _save_message(path, "Latency", "not measured")
        return
    plt = pyplot()
    sizes = list(dict.fromkeys(t["lr_size"] for r in series for t in r["throughput"]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.4 * len(series) * len(sizes)), 4))
    for j, r in enumerate(series):
        by_size = {t["lr_size"]: t for t in r["throughput"]}
        xs = [i + (j - (len(series) - 1) / 2) * width for i, s in enumerate(sizes) if s in by_size]
        p50 = [by_size[s]["p50_ms"] for s in sizes if s in by_size]
        up = [max(by_size[s]["p95_ms"] - by_size[s]["p50_ms"], 0.0) for s in sizes if s in by_size]
        ax.bar(xs, p50, width, yerr=[[0.0] * len(up), up], capsize=3, label=_label(r))
    p50s = [t["p50_ms"] for r in series for t in r["throughput"]]
    p95s = [t["p95_ms"] for r in series for t in r["throughput"]]
    if min(p50s) > 0 and max(p95s) / min(p50s) > LOG_SCALE_SPREAD:
        ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlabel("LR size")
    ax.set_ylabel("latency ms (bar p50, whisker p95)")
    ax.set_title(f"Latency, x{report['scale']}")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _plot_crops(path: Path, crops: list[tuple[str, np.ndarray]]) -> None:
    if not crops:
        _save_message(path, "Crops", "no crops")
        return
    plt = pyplot()
    h, w = crops[0][1].shape[:2]
    cols = min(CROPS_PER_ROW, len(crops))
    nrows = math.ceil(len(crops) / cols)
    cell = 3.0
    fig, axes = plt.subplots(nrows, cols, figsize=(cell * cols, (cell * h / w + 0.4) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (label, image) in zip(axes.flat, crops):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize="small")
    save_figure(fig, path)
