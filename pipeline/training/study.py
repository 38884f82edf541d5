"""Paired comparison of distillation variants: per-image differences against a baseline, a bootstrap interval over
images and seeds, a verdict, and the table and plot of `pipeline ablate` and `pipeline sweep`.

Within a seed every variant starts from the same weights and sees the same batches, so the difference of two
variants on one image of one seed is a paired difference. The interval resamples seeds and images independently
(with replacement) and takes the mean difference of each resample: it covers both the seed noise of training and
the choice of test images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import METHODS
from pipeline.errors import UserError
from pipeline.plots import pyplot
from pipeline.rundir import RunDir, write_json_atomic, write_text_atomic

BASELINE = "none"
RESAMPLES = 10_000
LEVEL = 0.95


def bootstrap_interval(diffs: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` (seeds x images), seeds and images resampled independently."""
    n_seeds, n_images = diffs.shape
    if n_seeds < 2:
        raise ValueError("an interval over seeds needs at least 2 seeds")
    rng = np.random.default_rng(seed)
    s = rng.integers(n_seeds, size=(resamples, n_seeds))
    i = rng.integers(n_images, size=(resamples, n_images))
    means = diffs[s[:, :, None], i[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


# Two-sided 95 % quantiles of Student's t by degrees of freedom, from the standard table; beyond it the
# Cornish-Fisher expansion around the normal quantile (error below 1e-3 from 30 degrees of freedom on).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t95(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 seeds")
    if df <= len(T95):
        return T95[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_t_interval(diffs: np.ndarray) -> tuple[float, float]:
    """95 % t interval of the mean difference with the seed as the unit of replication: each seed's mean over the
    images (seeds x images), then mean +- t(seeds - 1) x sd / sqrt(seeds). It carries the seed-to-seed noise in
    full, which a bootstrap over 3 seeds understates (its interval is close to the seeds' range)."""
    per_seed = np.asarray(diffs, dtype=np.float64).mean(axis=1)
    n = len(per_seed)
    half = t95(n - 1) * per_seed.std(ddof=1) / np.sqrt(n)
    return float(per_seed.mean() - half), float(per_seed.mean() + half)


def verdict(lo: float, hi: float) -> str:
    return "better" if lo > 0 else "worse" if hi < 0 else "indistinguishable"


def compare(psnr: dict[str, np.ndarray], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per variant: mean Y-PSNR and, except for the baseline, the paired difference to it with its interval.

    `psnr[variant]` is (seeds x images), the same seeds and images in the same order for every variant.
    """
    base = psnr[baseline]
    rows = []
    for name, values in psnr.items():
        row: dict[str, Any] = {"variant": name, "psnr_y": float(values.mean()),
                               "psnr_y_per_seed": values.mean(axis=1).tolist()}
        if name != baseline:
            diffs = values - base
            row["diff"] = float(diffs.mean())
            if diffs.shape[0] >= 2:
                lo, hi = bootstrap_interval(diffs)
                t_lo, t_hi = seed_t_interval(diffs)
                # The verdict takes the more conservative of the two: it must hold under both intervals.
                row.update(ci_low=lo, ci_high=hi, t_low=t_lo, t_high=t_hi, verdict=verdict(min(lo, t_lo),
                                                                                         max(hi, t_hi)))
        rows.append(row)
    return rows


def contrasts(psnr: dict[str, np.ndarray], target: str, baseline: str = BASELINE) -> list[dict[str, Any]]:
    """`target` against every other variant but the baseline, paired as in `compare`: one row per other variant."""
    rows = []
    for other in psnr:
        if other in (target, baseline):
            continue
        row = compare({other: psnr[other], target: psnr[target]}, baseline=other)[1]
        rows.append({**row, "variant": target, "against": other})
    return rows


def gate_stats(log_path: Path) -> dict[str, float]:
    """From a distillation log: the mean gate rate over the training patches and the last validation probe."""
    if not log_path.exists():
        return {}
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r["gate_rate"] for r in records if "gate_rate" in r]
    probes = [r["probe"] for r in records if "probe" in r]
    out = {"train_gate_rate": float(np.mean(train))} if train else {}
    if probes:
        out.update(probes[-1])
    return out


def _intervals(row: dict[str, Any]) -> str:
    """The seed-t and bootstrap cells of a row (empty without an interval)."""
    if "ci_low" not in row:
        return " | "
    return f"[{row['t_low']:+.3f}, {row['t_high']:+.3f}] | [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def format_study(title: str, rows: list[dict[str, Any]], fixed: list[tuple[str, float]], seeds: list[int],
                 baseline: str = BASELINE, pairs: list[dict[str, Any]] | None = None) -> str:
    """Markdown: the fixed rows (bicubic, teacher), then one row per variant with its difference to the baseline;
    then, given `pairs` (from `contrasts`), one row per other variant with the target's difference to it."""
    pct = f"{LEVEL:.0%}"
    lines = [title, "",
             f"| model | mean Y-PSNR (dB) | minus `{baseline}` (dB) | {pct} seed-t interval | {pct} bootstrap | "
             "verdict | gate rate, train | gate rate, val | teacher advantage, val (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | | | | | | | |" for name, value in fixed]
    for r in rows:
        interval = _intervals(r)
        diff = f"{r['diff']:+.3f}" if "diff" in r else "(baseline)"
        gates = [f"{r[k]:.3f}" if k in r else "" for k in ("train_gate_rate", "val_gate_rate")]
        advantage = f"{r['val_advantage_db']:+.3f}" if "val_advantage_db" in r else ""
        lines.append(f"| {r['variant']} | {r['psnr_y']:.3f} | {diff} | {interval} | {r.get('verdict', '')} | "
                     f"{gates[0]} | {gates[1]} | {advantage} |")
    if pairs:
        lines += ["", f"| comparison | difference (dB) | {pct} seed-t interval | {pct} bootstrap | verdict |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['variant']} minus {p['against']} | {p['diff']:+.3f} | {_intervals(p)} | "
                  f"{p.get('verdict', '')} |" for p in pairs]
    if len(seeds) < 2:
        lines += ["", "One seed: no interval can be given (the interval resamples seeds; run at least 2)."]
    else:
        lines += ["", f"Seeds {', '.join(map(str, seeds))}; paired per image and seed against `{baseline}` (same "
                  f"initial weights and batches within a seed); seed-t: t interval over the seeds' mean "
                  f"differences (df = seeds - 1); bootstrap: over seeds and images ({RESAMPLES} resamples); "
                  "verdict: better / worse only when both intervals exclude 0."]
    return "\n".join(lines) + "\n"


def plot_study(path: Path, rows: list[dict[str, Any]], title: str, baseline: str = BASELINE) -> None:
    """Mean difference to the baseline with its interval, one bar per variant."""
    plt = pyplot()
    shown = [r for r in rows if "diff" in r]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(shown) + 1.5))
    y = np.arange(len(shown))
    diffs = np.array([r["diff"] for r in shown])
    err = np.array([[r["diff"] - r.get("ci_low", r["diff"]), r.get("ci_high", r["diff"]) - r["diff"]]
                    for r in shown]).T
    ax.errorbar(diffs, y, xerr=err if len(shown) else None, fmt="o", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["variant"] for r in shown])
    ax.set_xlabel(f"mean Y-PSNR minus {baseline} (dB), {LEVEL:.0%} interval")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """`["facd.tau=0.07,0.15"]` -> {"facd.tau": ["0.07", "0.15"]} (values as TOML text, checked by the config)."""
    out: dict[str, list[str]] = {}
    for text in grid:
        key, sep, values = text.partition("=")
        key, points = key.strip(), [v.strip() for v in values.split(",")]
        if not sep or not key or not all(points):
            raise UserError(f"--grid expects KEY=V1,V2,..., got {text!r}")
        if key in out:
            raise UserError(f"--grid names {key} twice; give all its values once: --grid {key}=V1,V2,...")
        twice = sorted({v for v in points if points.count(v) > 1})
        if twice:
            raise UserError(f"--grid {key} lists {', '.join(twice)} more than once")
        out[key] = points
    return out


def check_seeds(seeds: list[int]) -> list[int]:
    """Distinct seeds >= 0 (a seed counted twice would narrow the interval with a copy of itself)."""
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UserError(f"--seeds lists {', '.join(map(str, twice))} more than once; each seed is one replicate")
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds must be integers >= 0, got {' '.join(map(str, seeds))}")
    return seeds


def variant_slug(name: str, method: str) -> str:
    """A file name for a variant: its method (ablate), or its method and grid point (sweep: `facd-tau0.07`)."""
    if name in METHODS:
        return name
    return "-".join([method] + [key.split(".")[-1] + value for key, value in (part.split("=", 1)
                                                                              for part in name.split(", "))])


def write_study(run: RunDir, stem: str, title: str, study: dict[str, Any], students: dict[str, dict[int, Path]],
                results: list[dict[str, Any]], teacher_label: str, target: str | None) -> str:
    """`<run>/<stem>.{json,md,png}` from the evaluation `results` (bicubic, the teacher, then `<variant> seed <k>`
    for every student); `study` holds the config, seeds and variants (as dicts). Returns the table."""
    seeds, variants = study["seeds"], study["variants"]
    by_label = {r["model"]: r for r in results}
    psnr = {name: np.array([[row["psnr_y"] for row in by_label[f"{name} seed {seed}"]["rows"]] for seed in seeds])
            for name in variants}
    rows = compare(psnr)
    for row in rows:
        stats = [gate_stats(students[row["variant"]][seed].with_suffix("") / "log.jsonl") for seed in seeds]
        for key in ("train_gate_rate", "val_gate_rate", "val_advantage_db"):
            if all(key in st for st in stats):
                row[key] = float(np.mean([st[key] for st in stats]))
    pairs = contrasts(psnr, target) if target in psnr and target != BASELINE else []
    fixed = [("bicubic", results[0]["mean"]["psnr_y"]), (teacher_label, results[1]["mean"]["psnr_y"])]
    table = format_study(title, rows, fixed, seeds, pairs=pairs)
    with run.staged() as tmp:
        write_json_atomic(tmp / f"{stem}.json", {"title": title, **study, "fixed": dict(fixed), "rows": rows,
                                                 "pairs": pairs, "results": results})
        write_text_atomic(tmp / f"{stem}.md", table)
        plot_study(tmp / f"{stem}.png", rows, title.split(",")[0])
    return table
