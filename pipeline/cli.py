"""`pipeline` command line: parses arguments, loads the config, calls one stage. No logic of its own."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config import BACKENDS, DEFAULT_OVERLAP, DEFAULT_TILE, METHODS
from pipeline.errors import GateFailed, TrainingDiverged, UserError, report_internal_error
from pipeline.rundir import (BUDGET_DIR, BUDGET_JSON, LATENCY_JSON, MANIFEST, ONNX, STUDENT, RunDir, check_writable,
                             versions, write_json_atomic)

log = logging.getLogger("pipeline")

# Failed writes that are the machine's state, not a bug: one `error:` line.
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.ENOTDIR: "a folder in the path is a file", errno.EEXIST: "a file is where a folder must be"}

EPILOG = {
    "config": "example: pipeline config --show --preset rcan_paper --set train.iters=1000",
    "models": "example: pipeline models --scale 4 --lr-size 320x180",
    "degrade": "example: pipeline degrade --hr photos/ --scale 4 --out photos_x4/",
    "score": "example: pipeline score --sr results/x4 --hr Set5/HR --scale 4 --json scores.json",
    "teacher": "example: pipeline teacher --set train.iters=2000   (then --resume if it was interrupted)",
    "eval": "example: pipeline eval --model runs/tiny/teacher.pt --data embedded --json eval.json",
    "distill": "example: pipeline distill --method facd --set train.iters=2000\n"
               "         torchrun --standalone --nproc_per_node=2 -m pipeline distill --method facd   (DDP, gloo on CPUs)",
    "ablate": "example: pipeline ablate --methods none out fd facd facd-nogate --seeds 0 1 2",
    "sweep": "example: pipeline sweep --grid distill.lambda_facd=0.03,0.1,0.3 --grid facd.tau=0.07,0.15 --seeds 0 1",
    "kernels": "example: pipeline kernels build --arch sm_87 sm_90   (default: sm_80 sm_86 sm_87 sm_89 sm_90 + PTX)",
    "export": "example: pipeline export --run-dir runs/tiny   (or --student my_student.pt)",
    "quantize": "example: pipeline quantize --set quant.method=entropy --set quant.max_drop_db=0.05\n"
                "         pipeline quantize --calib runs/tiny/calib.npz   (reuse a saved calibration set)",
    "build": "example: pipeline build --run-dir runs/tiny --set engine.profile=1080p   (on the GPU that will run it)",
    "doctor": "example: pipeline doctor   (or --json)",
    "upscale": "example: pipeline upscale photos/ --out photos_x4/ --backend onnxruntime --precision int8\n"
               "         pipeline upscale big.png --out out/ --model student.fp16.plan --backend tensorrt",
    "bundle": "example: pipeline bundle --run-dir runs/tiny --out deploy/tiny   "
              "(on the device: tar xzf tiny.tar.gz && make -C tiny verify)",
    "verify": "example: pipeline verify --run-dir runs/tiny   (on the target device: pipeline verify --require trt)",
    "budget": "example: pipeline budget --frame 1280x720 --backend onnxruntime --precision int8 --budget-ms 100\n"
              "         pipeline budget --bundle probe/   (on the device: make -C probe probe; then --latency-table "
              "probe/latency.json)",
    "all": "example: pipeline all   (or: pipeline all --teacher edsr_x4.pt --preset edsr_paper)\n"
           "         pipeline all --budget-ms 100 --frame 1280x720 --backend onnxruntime --precision int8",
}


def _versions_text() -> str:
    return f"facd-pipeline {__version__} (" + ", ".join(f"{k} {v}" for k, v in versions().items()
                                                      if k != "facd-pipeline") + ")"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", default="tiny", help="named preset (see `pipeline config --list`; default: tiny)")
    g.add_argument("--config", metavar="TOML", help="a TOML file of overrides on top of the preset")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.iters=200 (repeatable)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--run-dir", type=Path, help="where artifacts go (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="redo stages even when their inputs and config are unchanged")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency budget (the budget.* config keys)")
    g.add_argument("--budget-ms", type=float, metavar="X", help="p95 latency of one frame the student must meet")
    g.add_argument("--frame", metavar="WxH", help="HR output frame size (default 1280x720)")
    g.add_argument("--backend", choices=BACKENDS, help="the runtime (default onnxruntime; openvino: on the CPU)")
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="the precision (default int8)")
    g.add_argument("--latency-table", type=Path, metavar="FILE",
                   help="a latency.json from a probe folder's `make probe` instead of timing here")


def _budget_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides the budget options stand for (checked with the rest of the config)."""
    import json

    values = {"budget_ms": args.budget_ms, "frame": args.frame, "backend": args.backend,
              "precision": args.precision,
              "latency_table": None if args.latency_table is None else str(args.latency_table)}
    return [f"budget.{k}={json.dumps(v)}" for k, v in values.items() if v is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Distil, export, quantize and verify small super-resolution students (FACD).",
        epilog="Run `pipeline COMMAND --help` for each command's options.",
    )
    parser.add_argument("--version", action="version", version=_versions_text())
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars, warnings only")
        return p

    p = command("config", "print the effective configuration (TOML) or list the presets")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the effective config (the default action)")
    p.add_argument("--list", action="store_true", help="list the named presets")

    p = command("models", "list the model presets with parameter counts and FLOPs")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
    p.add_argument("--lr-size", default="320x180", metavar="WxH", help="LR input size for FLOPs (default 320x180)")

    p = command("degrade", "make the LR set of a folder of HR images (mod-crop + MATLAB bicubic)")
    p.add_argument("--hr", type=Path, required=True, help="folder of HR images")
    p.add_argument("--scale", type=int, required=True, help="2, 3 or 4")
    p.add_argument("--out", type=Path, required=True, help="output folder (PNG, same stems)")
    p.add_argument("--overwrite", action="store_true", help="replace LR images that exist already in --out")

    p = command("score", "Y-PSNR / Y-SSIM of a folder of SR images against their HR images")
    p.add_argument("--sr", type=Path, required=True, help="folder of super-resolved images")
    p.add_argument("--hr", type=Path, required=True, help="folder of HR images (mod-cropped by score itself)")
    p.add_argument("--scale", type=int, required=True, help="2, 3 or 4 (also the border shaved)")
    p.add_argument("--json", type=Path, help="also write the table as JSON (an infinite PSNR, of identical images, "
                                             "as null with a note)")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")

    p = command("teacher", "train the teacher (L1, Adam) into <run-dir>/teacher.pt")
    _add_run_args(p)

    p = command("eval", "evaluate a checkpoint (or bicubic) on a dataset: per-image and mean Y-PSNR / SSIM")
    p.add_argument("--model", required=True, help="a checkpoint (ours, EDSR-PyTorch or BasicSR) or 'bicubic'")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (default: the 24 shipped eval crops), 'embedded-eval7' (the 7 eval photos of "
                        "earlier releases), 'embedded-train', 'embedded-val', or a folder (HR-only or HR/ + "
                        "LR_bicubic/X{s}/)")
    p.add_argument("--scale", type=int, help="2, 3 or 4 (default: the checkpoint's; 4 for bicubic)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")

    p = command("distill", "distil the student from the teacher into <run-dir>/student.pt")
    _add_run_args(p)
    _add_teacher_arg(p)
    p.add_argument("--method", choices=METHODS, help="sets distill.method (default: the config's; the CPU recipe: out)")

    p = command("ablate", "distil one student per method and seed from the same teacher; paired comparison with "
                "`none` on the eval set (ablation.{json,md,png})")
    _add_run_args(p)
    _add_teacher_arg(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"methods to compare with `none` (default: all of {', '.join(METHODS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="seeds per method (default: 0 1 2; the interval needs at least 2)")

    p = command("sweep", "choose hyperparameters on the validation split: distil distill.method at every grid point "
                "and `none`, per seed; paired comparison (sweep.{json,md,png})")
    _add_run_args(p)
    _add_teacher_arg(p)
    p.add_argument("--method", choices=METHODS, help="sets distill.method (default: the config's; the CPU recipe: out)")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="config key and its values; repeat for more keys (every combination is trained)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="SEED",
                   help="seeds per grid point (default: 0 1)")
    p.add_argument("--name", default="sweep", help="results go to <run-dir>/NAME.{json,md,png} (default: sweep); "
                   "students of every sweep share <run-dir>/sweep/, so a grid point trained before is reused")

    p = command("kernels", "build the fused contrastive CUDA kernel now (it is otherwise built at first use)")
    p.add_argument("action", choices=["build"], help="what to do: build")
    p.add_argument("--arch", nargs="+", metavar="SM", help="target architectures, e.g. sm_90 (default: all supported)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache holds this build")

    p = command("export", "export the student to student.fp32.onnx and student.fp16.onnx, checked against PyTorch")
    _add_run_args(p)
    p.add_argument("--student", type=Path, help="student checkpoint (default: <run-dir>/student.pt)")

    p = command("quantize", "calibrate on real LR crops and write student.int8.onnx (TensorRT) and "
                            "student.int8-cpu.onnx (CPUs), QDQ, sensitivity-guided")
    _add_run_args(p)
    p.add_argument("--calib", type=Path, metavar="NPZ", help="reuse this calibration set instead of drawing one")

    p = command("build", "build TensorRT plans (FP16, INT8) from the ONNX models on this GPU, with JSON sidecars")
    _add_run_args(p)
    p.add_argument("--precision", nargs="+", choices=["fp16", "int8"], default=["fp16", "int8"],
                   help="which plans to build (default: both)")

    p = command("doctor", "what this machine has (GPU, driver, CUDA, TensorRT, ONNX Runtime, nvcc) and what it enables")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")

    p = command("upscale", "super-resolve images or folders with any backend (tiled when large); names are kept")
    _add_config_args(p)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders of images")
    p.add_argument("--out", type=Path, required=True, help="output folder (never an input folder)")
    p.add_argument("--run-dir", type=Path, help="take the model from this run (default: runs/<config name>)")
    p.add_argument("--model", type=Path, help="a checkpoint (.pt), ONNX model (.onnx) or TensorRT plan (.plan) instead")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino", "tensorrt"], default="auto",
                   help="default: auto, the fastest that is installed and passed verify's gate: a TensorRT plan, "
                        "ONNX Runtime on a GPU, OpenVINO, else ONNX Runtime on the CPU (it says which)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="default: the --model file's, else fp32 (fp16 for tensorrt); int8 on the CPU provider "
                        "takes the U8S8 CPU model")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"LR tile side: larger images are processed in overlapping tiles (default {DEFAULT_TILE}; "
                        "0 = whole images, unless a TensorRT profile is smaller)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"LR pixels shared by neighbouring tiles (default {DEFAULT_OVERLAP})")
    p.add_argument("--batch", type=int, default=1, help="tiles or same-size images per call (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")

    p = command("bundle", "a self-contained deploy folder OUT/ and OUT.tar.gz for an edge device: ONNX models, "
                          "golden set, torch-free `make verify`")
    _add_config_args(p)
    p.add_argument("--run-dir", type=Path, help="the run to bundle (default: runs/<config name>)")
    p.add_argument("--out", type=Path, required=True, help="folder to write, with OUT.tar.gz beside it")
    p.add_argument("--force", action="store_true", help="replace an earlier bundle at OUT and OUT.tar.gz")

    p = command("verify", "every backend x precision vs the PyTorch FP32 reference: gates, throughput, report")
    _add_run_args(p)
    p.add_argument("--require", action="append", default=[], metavar="BACKEND",
                   help="fail when this backend cannot run here (e.g. trt, onnxruntime-cuda; repeatable)")

    p = command("budget", "time every candidate student shape (budget.blocks x budget.channels, random weights, the "
                          "target's export and precision recipe) on one frame with upscale's runner: budget.json, "
                          "budget.png; with --budget-ms, the choice")
    _add_config_args(p)
    _add_budget_args(p)
    p.add_argument("--out", type=Path, help="where budget.json, budget.png and latency.json go, recorded in its own "
                   "manifest.json (default: runs/<config name>/budget, recorded in that run, which `all --budget-ms` "
                   "then reuses)")
    p.add_argument("--bundle", type=Path, metavar="DIR", help="instead: write a torch-free probe folder (candidate "
                   "ONNX models, `make probe`) for a device that cannot train")
    p.add_argument("--force", action="store_true", help="time again even when the recorded table is up to date; "
                   "with --bundle, replace an existing probe folder")

    p = command("all", "every stage in order: teacher (unless --teacher is given), distill (distill.method), eval, "
                       "export, quantize, build (where TensorRT runs), verify")
    _add_run_args(p)
    p.add_argument("--teacher", type=Path, help="use this teacher checkpoint instead of training one")
    _add_budget_args(p)
    return parser


def _setup_logging(quiet: bool, run_dir: Path | None = None) -> None:
    """Console handler (INFO, or WARNING with -q) and, for a run, `<run-dir>/run.log` (always INFO).

    Calling it again replaces the handlers of the previous call.
    """
    log.setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # libraries that log through the root logger (ONNX Runtime's quantizer's
        logging.getLogger().addHandler(logging.NullHandler())  # advice) would otherwise install a console handler
    for old in [h for h in log.handlers if getattr(h, "from_cli", False)]:
        log.removeHandler(old)
        old.close()
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handlers: list[logging.Handler] = [console]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "run.log"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in handlers:
        h.from_cli = True  # type: ignore[attr-defined]
        log.addHandler(h)


def _run(args: argparse.Namespace) -> None:
    from pipeline import config as config_mod

    progress = not args.quiet
    if args.command == "config":
        if args.list:
            for name, text in config_mod.PRESET_HELP.items():
                print(f"{name:12s} {text}")
            return
        cfg = config_mod.load_config(args.preset, args.config, args.overrides)
        print(config_mod.to_toml(cfg), end="")
        return
    if args.command == "models":
        from pipeline.data.degrade import SCALES
        from pipeline.modelio import models_table

        if args.scale not in SCALES:
            raise UserError(f"--scale must be one of {', '.join(map(str, SCALES))}, got {args.scale}")
        print(models_table(args.scale, config_mod.parse_size(args.lr_size, "--lr-size")))
        return
    if args.command == "degrade":
        from pipeline.data.degrade import degrade_folder

        written = degrade_folder(args.hr, args.scale, args.out, overwrite=args.overwrite)
        print(f"wrote {len(written)} LR image(s) to {args.out}")
        return
    if args.command == "score":
        from pipeline.evaluation.score import format_table, score_folders

        _check_json_out(args)
        rows = score_folders(args.sr, args.hr, args.scale)
        print(format_table(rows, f"{args.sr} vs {args.hr}, x{args.scale}"))
        if args.json:
            _write_json(args.json, rows)
        return
    if args.command == "eval":
        _eval(args, progress)
        return
    if args.command == "doctor":
        import json

        from pipeline.doctor import doctor_report, format_doctor

        report = doctor_report()
        print(json.dumps(report, indent=2) if args.json else format_doctor(report))
        return
    if args.command == "upscale":
        _upscale(args, config_mod.load_config(args.preset, args.config, args.overrides), progress)
        return
    if args.command == "kernels":
        from kernels import KernelUnavailable, build_kernel

        try:
            print(f"built {build_kernel(args.arch, force=args.force, verbose=progress)}")
        except KernelUnavailable as e:
            raise UserError(str(e)) from None
        return

    overrides = list(args.overrides)
    if getattr(args, "method", None):
        overrides.append(f'distill.method="{args.method}"')
    if args.command in ("budget", "all"):
        overrides += _budget_overrides(args)
    cfg = config_mod.load_config(args.preset, args.config, overrides)
    if args.command == "budget":
        _budget(args, cfg, progress)
        return
    from pipeline import stages

    run = RunDir(args.run_dir or Path("runs") / cfg.name)
    # bundle only reads the run; verify writes its report where it can. Neither creates a missing run directory.
    reader = args.command in ("bundle", "verify")
    run.check_folder(must_exist=reader)
    if not reader:
        check_writable(run.root)
    writes = not reader or (args.command == "verify" and run.writable())
    if not stages.is_main_process():  # the other ranks of a torchrun launch: rank 0 alone writes and shows progress
        _setup_logging(quiet=True)
        _run_stage(args, cfg, run, progress=False)
        return
    with run.lock(args.command, shared=not writes):
        _setup_logging(args.quiet, run.root if writes else None)
        _run_stage(args, cfg, run, progress)


def _run_stage(args: argparse.Namespace, cfg: object, run: RunDir, progress: bool) -> None:
    from pipeline import stages
    from pipeline.training import study

    if args.command == "teacher":
        stages.stage_teacher(cfg, run, resume=args.resume, force=args.force, progress=progress)
    elif args.command in ("distill", "ablate", "sweep"):
        if args.command != "distill":  # bad lists are refused before a teacher is trained
            study.check_seeds(args.seeds)
            axes = study.parse_grid(args.grid) if args.command == "sweep" else {}
        teacher = stages.resolve_teacher(cfg, run, args.teacher, resume=args.resume, force=args.force,
                                         progress=progress)
        if args.command == "distill":
            stages.stage_distill(cfg, run, teacher, resume=args.resume, force=args.force, progress=progress)
        elif args.command == "ablate":
            stages.stage_ablate(cfg, run, teacher, args.methods, args.seeds, resume=args.resume, force=args.force,
                                progress=progress)
        else:
            stages.stage_sweep(cfg, run, teacher, axes, args.seeds, name=args.name, resume=args.resume,
                               force=args.force, progress=progress)
    elif args.command == "export":
        student = args.student or run.path(STUDENT)
        if not student.exists():
            raise UserError(f"no student at {student}: distil one with `pipeline distill` or pass --student CKPT")
        stages.stage_export(cfg, run, student, force=args.force)
    elif args.command == "quantize":
        fp32, fp16 = run.path(ONNX["fp32"]), run.path(ONNX["fp16"])
        if not (fp32.exists() and fp16.exists()):
            raise UserError(f"no exported models in {run.root}: run `pipeline export` first")
        stages.stage_quantize(cfg, run, fp32, fp16, calib=args.calib, force=args.force, progress=progress)
    elif args.command == "build":
        stages.stage_build(cfg, run, args.precision, force=args.force)
    elif args.command == "bundle":
        from pipeline.deploy.bundle import make_bundle

        print(f"wrote {make_bundle(cfg, run.root, args.out, force=args.force, progress=progress)}")
    elif args.command == "verify":
        stages.stage_verify(cfg, run, require=args.require, force=args.force, progress=progress)
    elif args.command == "all":
        stages.run_all(cfg, run, teacher=args.teacher, resume=args.resume, force=args.force, progress=progress)


def _add_teacher_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", type=Path, help="teacher checkpoint or published weights (default: "
                   "<run-dir>/teacher.pt if `pipeline teacher` made one, else the shipped teacher of model.teacher, "
                   "else one trained now)")


def _eval(args: argparse.Namespace, progress: bool) -> None:
    from pipeline.backends.base import BicubicRunner
    from pipeline.backends.torch_runner import TorchRunner
    from pipeline.modelio import load_model
    from pipeline.evaluation.score import format_table
    from pipeline.evaluation.evaluate import eval_rows

    _check_json_out(args)
    if args.model == "bicubic":
        scale = args.scale or 4
        runner = BicubicRunner(scale)
    else:
        model = load_model(Path(args.model), args.scale)
        scale = model.scale
        runner = TorchRunner(model)
    result = eval_rows(runner, args.data, scale, progress)
    print(format_table(result["rows"], f"{args.model} on {args.data}, x{scale}"))
    if args.json:
        _write_json(args.json, result)


def _upscale(args: argparse.Namespace, cfg: object, progress: bool) -> None:
    from pipeline.deploy.upscale import collect_inputs, make_runner, upscale

    out = args.out.resolve()
    run_root = next((p for p in (out, *out.parents) if (p / MANIFEST).is_file()), None)
    if run_root is not None:
        where = "is a run directory" if run_root == out else f"is inside the run directory {run_root}"
        raise UserError(f"--out {args.out} {where}: choose another folder, a run's files are never written by "
                        "upscale")
    pairs = collect_inputs(args.inputs, args.out, args.overwrite)
    if args.model and args.run_dir:
        raise UserError("give --model or --run-dir, not both")
    tiling = {"tile": args.tile, "overlap": args.overlap, "batch": args.batch}
    if min(args.tile, args.overlap) < 0 or args.batch < 1 or 0 < args.tile <= args.overlap:
        raise UserError("--tile must be 0 or larger than --overlap (>= 0), and --batch >= 1")
    runner = make_runner(args.backend, args.precision, args.run_dir or Path("runs") / cfg.name, args.model, tiling)
    written = upscale(runner, pairs, progress)
    print(f"wrote {len(written)} image(s) to {args.out}")


def _check_json_out(args: argparse.Namespace) -> None:
    """Before any work: `--json` must name a file that does not exist yet (or `--overwrite` replaces it)."""
    path = args.json
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; name a file")
    if (path.exists() or path.is_symlink()) and not args.overwrite:
        raise UserError(f"--json {path} exists already: pass --overwrite to replace it, or name another file")


def _budget(args: argparse.Namespace, cfg: object, progress: bool) -> None:
    """A probe folder (--bundle), or the budget stage in `--out` (a run directory of its own) or, by default, in
    `runs/<config name>/budget` (the folder `pipeline all --budget-ms` reads, so its timing is reused)."""
    b = cfg.budget
    if args.bundle:
        from pipeline.deploy.budget import make_probe_folder

        if b.latency_table or b.budget_ms:
            raise UserError("--bundle writes a probe folder to time on the device; --budget-ms and --latency-table "
                            "come after, with the latency.json it gives")
        folder = make_probe_folder(cfg, args.bundle, force=args.force, progress=progress)
        print(f"wrote {folder}: on the device run `make -C {folder.name} probe`, then bring "
              f"{folder.name}/{LATENCY_JSON} back as --latency-table")
        return
    from pipeline import stages
    from pipeline.deploy.probe import load_table

    if b.latency_table:  # a table made for another setting is refused before any folder is made
        load_table(Path(b.latency_table), cfg.scale, b.frame, b.backend, b.precision)
    run, folder = (RunDir(args.out), "") if args.out else (RunDir(Path("runs") / cfg.name), BUDGET_DIR)
    run.check_folder()
    check_writable(run.root)
    with run.lock("budget"):
        _setup_logging(args.quiet, run.root)
        stages.stage_budget(cfg, run, folder=folder, force=args.force, progress=progress)
    print(f"wrote {run.path(folder) / BUDGET_JSON}")


def _write_json(path: Path, data: object) -> None:
    write_json_atomic(path, _standard_json(data))
    print(f"wrote {path}")


def _standard_json(data: object) -> object:
    """`data` with each infinite or NaN number (the PSNR of identical images) as null, and a note in its object:
    standard JSON has no Infinity."""
    if isinstance(data, list):
        return [_standard_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    out = {k: _standard_json(v) for k, v in data.items()}
    odd = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    for k in odd:
        out[k] = None
    if odd:
        out["note"] = f"{', '.join(odd)}: infinite (identical images), written as null"
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from models import CheckpointError

    try:
        _run(args)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (GateFailed, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            return _internal_error(args, e)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {WRITE_ERRORS[e.errno]}{where}: {e.strerror}; the file being written was not put in place, "
              "nothing already there was replaced", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - ours, not the user's: named, logged, and never exit 1 or 2
        return _internal_error(args, e)
    finally:
        _leave_process_group()
    return 0


def _internal_error(args: argparse.Namespace, error: BaseException) -> int:
    """The traceback goes into the run directory where there is one (a container's /tmp vanishes with it)."""
    run_dir = getattr(args, "run_dir", None)
    return report_internal_error(error, run_dir if run_dir and Path(run_dir).is_dir() else None)


def _leave_process_group() -> None:
    """Under torchrun: leave the process group (a process that exits while still in it can hang)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
