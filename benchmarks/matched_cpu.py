"""Matched compute: every distilled or plain-trained student of the given run folders, with its training wall clock
(one thread, from its log) and its eval-set Y-PSNR as it trained, against a reference group (default: `none` at
`pipeline all`'s 600 iterations: the same student without a teacher), on the validation split (where a choice is made)
and on the eval set (what is reported).

    python benchmarks/matched_cpu.py --runs runs/matched24 runs/students24 --out benchmarks/results/matched_cpu_eval24 \
        --recorded benchmarks/results/matched_cpu_eval24.json

A run is any `<folder>/<name>/` holding `student.pt` and `student/log.jsonl`; its method, iterations, student and
seed come from its manifest (the distill stage's config). Wall clock: the sum over the log's records of
log_every x batch / patches_per_s, i.e. training steps only (evaluations and checkpoints excluded), on the CPU its
lane recorded at each start (`machine.jsonl`, benchmarks/matched_cpu.sh); a group's wall clock is its runs' on the CPU
most runs trained on (the others' are listed, not averaged in: another CPU runs at another speed). Each run's final
student is evaluated per image on both splits, so that every (method, iterations) group is compared with the
reference group, with the `none` group of the nearest wall clock, with the method it extends at the same iterations
(`fd` against `out`, `facd` against `fd`) and (a grid point) with the same method at the config's weights, paired
per seed and image (seed-level t interval and bootstrap). A method's label carries each weight that differs from the
config's default.
`--recorded`: an earlier results file, whose run records (curve and per-image Y-PSNR) stand in for the runs whose
folders are gone (a fresh checkout holds only the committed results); a folder present is evaluated afresh.
`--partial`: marks the tables PARTIAL, while runs of benchmarks/matched_cpu.sh are still to finish.
Writes `<out>.json`, `<out>.md` and `<out>.png` (the learning curves, with the teacher's eval Y-PSNR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models import count_flops, create_model
from pipeline.config import DistillSection, load_config
from pipeline.evaluation.evaluate import eval_models, validation_split
from pipeline.machine import machine
from pipeline.plots import pyplot, save_figure
from pipeline.rundir import STUDENT, load_manifest, versions, write_json_atomic, write_text_atomic
from pipeline.training import study
from pipeline.training.teachers import shipped_teacher

def gflops_per_iter(config: dict[str, Any], teacher: str) -> float:
    """Convolution GFLOPs of one training iteration: the student's forward and backward (3 forwards) and, for a
    method with a teacher, the teacher's forward, on one batch of LR patches (the adaptors and the contrastive
    similarity are left out)."""
    train, scale, patch = config["train"], config["scale"], (config["train"]["lr_patch"],) * 2
    flops = 3 * count_flops(create_model(config["model.student"], scale=scale), patch)
    if config["distill"]["method"] != "none":
        flops += count_flops(create_model(teacher, scale=scale), patch)
    return flops * train["batch"] / 1e9


# Each feature method against the one it extends: fd adds a feature term to out; facd swaps that term for the
# contrastive one (and gates both terms).
EXTENDS = {"fd": "out", "facd": "fd"}


def variant(distill: dict[str, Any]) -> str:
    """The method, with each weight or gate margin it uses that differs from the config's default."""
    default, method = DistillSection(), distill["method"]
    used = {"out": ["lambda_out"], "fd": ["lambda_out", "lambda_fd"],
            "facd": ["lambda_out", "lambda_facd", "gate_margin", "gate_fraction"],
            "facd-nogate": ["lambda_out", "lambda_facd"]}.get(method, [])
    changed = [f"{key} {distill[key]:g}" for key in used if distill[key] != getattr(default, key)]
    return f"{method} ({', '.join(changed)})" if changed else method


def cpu_of(record: dict[str, Any]) -> dict[str, Any]:
    """The CPU part of a `pipeline.machine.machine()` record (its platform string names the kernel build)."""
    return {key: record[key] for key in ("cpu", "cpu_flags", "cores")}


def run_machines(folder: Path) -> list[dict[str, Any]]:
    """The distinct CPUs a run trained on: its lane appends `machine()` to `machine.jsonl` at every start (one,
    unless it resumed elsewhere); empty when the file is missing (a run not started by benchmarks/matched_cpu.sh)."""
    path, seen = folder / "machine.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        if (cpu := cpu_of(json.loads(line))) not in seen:
            seen.append(cpu)
    return seen


def read_run(folder: Path, teacher: str) -> dict[str, Any]:
    """Method (its `variant` label), iterations, seed, student, the CPUs it trained on, the curve (iteration, wall
    clock s, eval Y-PSNR) of one run."""
    config = load_manifest(folder / "manifest.json")["artifacts"][STUDENT]["config"]
    train = config["train"]
    records = [json.loads(line) for line in (folder / "student" / "log.jsonl").read_text().splitlines()]
    clock, last, at = 0.0, 0, {}
    for r in records:
        if "patches_per_s" in r:
            clock += (r["iter"] - last) * train["batch"] / r["patches_per_s"]
            last = r["iter"]
        at[r["iter"]] = clock
    curve = [{"iter": r["iter"], "wall_s": at[r["iter"]], "psnr_y": r["eval"]["psnr_y"]} for r in records
             if "eval" in r]
    method = variant(config["distill"])
    return {"run": str(folder), "method": method, "iters": train["iters"],
            "seed": config["seed"], "student": config["model.student"], "machines": run_machines(folder),
            "wall_s": clock,
            "s_per_iter": clock / train["iters"], "gflops_per_iter": gflops_per_iter(config, teacher), "curve": curve,
            **study.gate_stats(folder / "student" / "log.jsonl")}


def recorded_runs(path: Path, present: set[str], teacher_psnr_y: float) -> list[dict[str, Any]]:
    """The run records of the earlier results file `path` whose folders are not in `present` (a record without its
    CPUs trained on the file's machine: the file predates per-run records); refused (SystemExit) when its teacher
    scored otherwise on the eval set: another eval set or teacher, not comparable."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable results file ({e})") from None
    if abs(earlier["eval_teacher_psnr_y"] - teacher_psnr_y) > 1e-3:
        raise SystemExit(f"{path}: its teacher scored {earlier['eval_teacher_psnr_y']:.4f} dB on the eval set, this "
                         f"one {teacher_psnr_y:.4f} dB: another eval set or teacher, so its runs are not comparable")
    return [{"machines": [cpu_of(earlier["machine"])], **r} for r in earlier["runs"] if r["run"] not in present]


def paired(this: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]], split: str) -> dict[str, Any] | None:
    """`this` minus `ref` on `split`, paired per seed and image (None with fewer than 2 common seeds)."""
    common = sorted(set(this) & set(ref))
    if len(common) < 2:
        return None
    psnr = {"ref": np.array([ref[k][split]["per_image"] for k in common]),
            "this": np.array([this[k][split]["per_image"] for k in common])}
    return {**study.compare(psnr, "ref")[1], "seeds": common}


def main_machine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The CPU most runs trained on, whole (a run that resumed on another CPU counts for none)."""
    singles = [r["machines"][0] for r in runs if len(r["machines"]) == 1]
    if not singles:
        raise SystemExit("no run records the CPU it trained on (machine.jsonl): wall clocks are not comparable")
    return max(singles, key=singles.count)


def timed_on(by_seed: dict[int, dict[str, Any]], cpu: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The runs of a group that trained on `cpu` alone; all of them when none did (the table then names their CPU)."""
    return {seed: r for seed, r in by_seed.items() if r["machines"] == [cpu]} or by_seed


def matched_none(groups: dict[tuple[str, int], dict[int, dict[str, Any]]], wall_s: float) -> int | None:
    """Iterations of the `none` group whose mean training wall clock is nearest `wall_s` (on a log scale)."""
    nones = {iters: np.mean([r["wall_s"] for r in by_seed.values()])
             for (method, iters), by_seed in groups.items() if method == "none"}
    return min(nones, key=lambda it: abs(np.log(nones[it] / wall_s))) if nones else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/matched24"), Path("runs/students24")],
                   help="folders of run folders (one that does not exist holds none)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/matched_cpu_eval24"))
    p.add_argument("--student", default="anchor_m")
    p.add_argument("--reference", default="none:600", help="the group every other is compared with: METHOD:ITERS")
    p.add_argument("--recorded", type=Path, help="an earlier results JSON: its records of runs whose folders are gone")
    p.add_argument("--partial", action="store_true", help="mark the tables PARTIAL (runs still to finish)")
    args = p.parse_args(argv)
    method, _, iters = args.reference.rpartition(":")
    reference = (method, int(iters))
    cfg = load_config()
    splits = {"val": validation_split(cfg), "eval": None}
    runs = [read_run(d, cfg.model.teacher) for root in args.runs if root.is_dir() for d in sorted(root.iterdir())
            if (d / STUDENT).is_file() and (d / "student" / "log.jsonl").is_file()]
    runs = [r for r in runs if r["student"] == args.student and r["curve"] and r["curve"][-1]["iter"] == r["iters"]]
    if not runs and not args.recorded:
        raise SystemExit(f"no finished {args.student} run in {', '.join(map(str, args.runs))} (--recorded: an earlier "
                         "results file whose records stand in for them)")
    for r in runs:
        for split, data in splits.items():
            (result,) = eval_models(cfg, {"s": Path(r["run"]) / STUDENT}, progress=False, data=data)[1:]
            r[split] = {"per_image": [row["psnr_y"] for row in result["rows"]], "psnr_y": result["mean"]["psnr_y"]}
    fixed = eval_models(cfg, {"teacher": shipped_teacher(cfg.model.teacher, cfg.scale)}, progress=False)
    if args.recorded:
        earlier = recorded_runs(args.recorded, {r["run"] for r in runs}, fixed[1]["mean"]["psnr_y"])
        runs = sorted(runs + [r for r in earlier if r["student"] == args.student], key=lambda r: r["run"])
    groups: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["iters"]), {})[r["seed"]] = r
    ref, cpu = groups.get(reference, {}), main_machine(runs)
    timed = {key: timed_on(by_seed, cpu) for key, by_seed in groups.items()}
    table = []
    for (method, iters), by_seed in sorted(groups.items(), key=lambda kv: np.mean([r["wall_s"]
                                                                                  for r in timed[kv[0]].values()])):
        clocked = timed[(method, iters)]
        row: dict[str, Any] = {"method": method, "iters": iters, "seeds": sorted(by_seed),
               "wall_s": float(np.mean([r["wall_s"] for r in clocked.values()])),
               "s_per_iter": float(np.mean([r["s_per_iter"] for r in clocked.values()])),
               "wall_clock_seeds": sorted(clocked),
               "other_cpu_wall_s": {seed: r["wall_s"] for seed, r in sorted(by_seed.items()) if seed not in clocked},
               "gflops_per_iter": by_seed[min(by_seed)]["gflops_per_iter"]}
        for key in ("train_gate_rate", "val_gate_rate"):
            if all(key in r for r in by_seed.values()):
                row[key] = float(np.mean([r[key] for r in by_seed.values()]))
        matched = matched_none(timed, row["wall_s"]) if method != "none" else None
        base = (method.split(" (")[0], iters)  # the same method with the config's weights and margin
        if matched:
            row["matched_none_iters"] = matched
        for split in splits:
            row[split] = {"psnr_y": float(np.mean([r[split]["psnr_y"] for r in by_seed.values()])),
                          "psnr_y_per_seed": [by_seed[k][split]["psnr_y"] for k in sorted(by_seed)]}
            if (method, iters) != reference:
                row[split]["minus_reference"] = paired(by_seed, ref, split)
            if matched and ("none", matched) != reference:
                row[split]["minus_matched_none"] = paired(by_seed, groups[("none", matched)], split)
            if (EXTENDS.get(method), iters) in groups:
                row[split]["minus_extended"] = paired(by_seed, groups[(EXTENDS[method], iters)], split)
            if base in groups and base != (method, iters):
                row[split]["minus_default_weights"] = paired(by_seed, groups[base], split)
        table.append(row)
    result = {"partial": args.partial, "machine": cpu, "evaluated_on": machine(), "versions": versions(),
              "student": args.student,
              "teacher": cfg.model.teacher, "eval_teacher_psnr_y": fixed[1]["mean"]["psnr_y"],
              "eval_bicubic_psnr_y": fixed[0]["mean"]["psnr_y"],
              "reference": f"{reference[0]} at {reference[1]} iterations", "groups": table, "runs": runs}
    write_json_atomic(args.out.with_suffix(".json"), result)
    write_text_atomic(args.out.with_suffix(".md"), format_table(result))
    plot(result, args.out.with_suffix(".png"))
    print(format_table(result))
    return 0


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    partial = "PARTIAL. " if result["partial"] else ""
    lines = [f"{partial}Matched compute on `{result['student']}` (x4, shipped {result['teacher']} teacher: eval "
             f"{result['eval_teacher_psnr_y']:.3f} dB; bicubic {result['eval_bicubic_psnr_y']:.3f} dB), Y-PSNR; "
             "training wall clock on one thread.", "",
             "| method | iterations | seeds | validation (per seed) | eval (per seed) | wall clock (s) | "
             "s / iteration | GFLOPs / iteration | gate rate train / val |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        gate = f"{g['train_gate_rate']:.4f} / {g['val_gate_rate']:.3f}" if "train_gate_rate" in g else ""
        per_seed = {split: f"{g[split]['psnr_y']:.3f} ({', '.join(f'{v:.3f}' for v in g[split]['psnr_y_per_seed'])})"
                    for split in ("val", "eval")}
        clock = f"{g['wall_s']:.0f}"
        if g["other_cpu_wall_s"]:
            seeds = g["wall_clock_seeds"]
            clock += (f" (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}; another CPU: "
                      f"{', '.join(f'seed {k} {v:.0f}' for k, v in g['other_cpu_wall_s'].items())})")
        lines.append(f"| {g['method']} | {g['iters']} | {len(g['seeds'])} | {per_seed['val']} | {per_seed['eval']} | "
                     f"{clock} | {g['s_per_iter']:.3f} | {g['gflops_per_iter']:.1f} | {gate} |")
    lines += ["", "Differences, paired per seed and image: against the reference "
              f"({result['reference']}), against `none` at the nearest training wall clock, against the method a "
              "feature method extends, and a grid point against its method's default. Seed-t 95 % interval "
              "(bootstrap over seeds and images); the verdict holds under both.", "",
              "| method | iterations | against | seeds | validation | eval |", "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        against = {"minus_reference": result["reference"],
                   "minus_matched_none": f"none at {g.get('matched_none_iters')} iterations (matched wall clock)",
                   "minus_extended": f"{EXTENDS.get(g['method'])} at {g['iters']} iterations (the method it extends)",
                   "minus_default_weights": f"{g['method'].split(' (')[0]} at {g['iters']} iterations (default "
                                            "weights and margin)"}
        for key, name in against.items():
            d = {split: g[split].get(key) for split in ("val", "eval")}
            if d["eval"] and "ci_low" in d["eval"]:
                cells = [f"{x['diff']:+.3f} [{x['t_low']:+.3f}, {x['t_high']:+.3f}] ([{x['ci_low']:+.3f}, "
                         f"{x['ci_high']:+.3f}]) {x['verdict']}" for x in (d["val"], d["eval"])]
                lines.append(f"| {g['method']} | {g['iters']} | {name} | {len(d['eval']['seeds'])} | {cells[0]} | "
                             f"{cells[1]} |")
    def described(cpu: dict[str, Any]) -> str:
        return f"{cpu['cpu']} ({cpu['cores']} cores; flags {', '.join(cpu['cpu_flags']) or 'none of AVX-512/VNNI/AMX'})"

    others = list({json.dumps(c): c for r in result["runs"] for c in r["machines"] if c != m}.values())
    elsewhere = f", another CPU's runs ({'; '.join(map(described, others))}) listed apart" if others else ""
    lines.append(f"\nWall clock: CPU {described(m)}{elsewhere}; one thread per run, other runs and jobs "
                 "sharing the cores (wall clocks carry their load). "
                 "GFLOPs / iteration: the Convs of the student's forward and backward (3 forwards) and of the "
                 "teacher's forward, on one batch. Validation: the 10 images no training stage saw "
                 "(`data.val_count` + `data.val`); eval: the 24 eval crops.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours, labelled, palette = {}, set(), plt.get_cmap("tab20").colors
    for r in result["runs"]:
        group = f"{r['method']} ({r['iters']} it)"
        colour = colours.setdefault(group, palette[len(colours) % len(palette)])
        for ax, key in zip(axes, ("wall_s", "iter")):
            elsewhere = key == "wall_s" and r["machines"] != [result["machine"]]
            ax.plot([c[key] for c in r["curve"]], [c["psnr_y"] for c in r["curve"]], marker=".", color=colour,
                    alpha=0.7, linestyle=":" if elsewhere else "-", label=None if group in labelled else group)
        labelled.add(group)
    for ax, name in zip(axes, ("training wall clock, one thread (s)", "iterations")):
        ax.axhline(result["eval_teacher_psnr_y"], color="k", linestyle="--", linewidth=1,
                   label=f"teacher ({result['teacher']})")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("eval-set Y-PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{'PARTIAL: ' if result['partial'] else ''}{result['student']}, every run and seed as it trained "
                 f"(wall clock on {result['machine']['cpu']}; dotted: another CPU)", fontsize="medium")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
