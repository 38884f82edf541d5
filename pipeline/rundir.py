"""The run directory: every artifact of a run, and `manifest.json` recording how each one was made.

A stage declares its inputs (files) and the config it depends on; together they give the stage a key: the config,
and each input's sha256 under its path relative to the run directory (inputs from elsewhere by content alone), so a
run directory that is copied or moved keeps its keys. When the manifest holds the same key for the stage and every
recorded output is still there with its recorded sha256, the stage is up to date and is skipped.

One writer at a time: the commands that write a run directory hold an exclusive `flock` on its `.lock` file;
readers (`pipeline bundle`, `verify` on a read-only run directory) take it shared where they can.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

MANIFEST = "manifest.json"
LOCK = ".lock"  # flock'ed by the process writing the run directory; holds its description
STAGING_PREFIX = ".stage-"  # RunDir.staged's folders
LOCK_WAIT_S = 5.0  # how long a second writer waits for the first before it gives up
# The artifacts the stages write, by name; every module that opens one takes its name from here.
TEACHER, STUDENT, CALIB = "teacher.pt", "student.pt", "calib.npz"
ONNX = {"fp32": "student.fp32.onnx", "fp16": "student.fp16.onnx",
        "int8": "student.int8.onnx",  # for TensorRT: S8S8 symmetric QDQ, FP16 rest
        "int8-cpu": "student.int8-cpu.onnx"}  # for ONNX Runtime on CPUs: U8S8 QDQ, integer between Convs
PLANS = {"fp16": "student.fp16.plan", "int8": "student.int8.plan"}
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
EXPORT_JSON, QUANT_JSON, QUANT_MD = "export.json", "quant.json", "quant.md"
REPORT_JSON = "report.json"
REPORT_FILES = ("report.md", "psnr.png", "latency.png", "crops.png")  # beside report.json
SUMMARY_JSON = "summary.json"
ABLATION, SWEEP = "ablation", "sweep"  # .json, .md and .png of `ablate` and `sweep`; students in ablate/ and sweep/
BUDGET_DIR = "budget"  # budget.json, budget.png and (when timed here) latency.json
LATENCY_JSON, BUDGET_JSON, BUDGET_PNG = "latency.json", "budget.json", "budget.png"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the user's umask cuts it: what a plain `open()` (0o666) or `mkdir()` (0o777) would give. Temporary
    files and folders are made private (0o600 / 0o700), and their mode would survive the rename into place."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, umask_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def is_own_folder(folder: Path, marker: str, fmt: str) -> bool:
    """`folder` is a folder (not a link) that this tool wrote: its `marker` file is JSON whose "format" is `fmt`."""
    try:
        return (not folder.is_symlink() and folder.is_dir()
                and json.loads((folder / marker).read_text()).get("format") == fmt)
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_replaceable(out: Path, *, force: bool, marker: str, fmt: str, what: str, option: str) -> None:
    """Before a command writes the folder `out` (`what` it makes, given as `option`): a UserError when it exists and
    `force` is not set, or when it exists and is not one this tool made (`is_own_folder`): `--force` replaces only
    our own folders, never a user's folder or a run directory."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise UserError(f"{out} already exists; choose another {option}, or pass --force to replace it")
    if not is_own_folder(out, marker, fmt):
        raise UserError(f"{out}: not {what} (no {marker} of {fmt}); --force replaces only {what} made by this tool, "
                        f"never other files: choose another {option}")


def replace_folder(staged: Path, out: Path) -> None:
    """Put the finished folder `staged` at `out` (same file system), moving an earlier `out` (checked with
    `check_replaceable`) into `staged`'s parent, a temporary folder the caller removes."""
    if out.exists():
        os.replace(out, staged.parent / f"replaced-{out.name}")
    os.replace(staged, out)
    os.chmod(out, umask_mode(0o777))  # the staging folder's private mode would survive the rename


def versions() -> dict[str, str]:
    """Versions of the package and of the dependencies that decide what an artifact contains."""
    out = {"python": platform.python_version()}
    for dist in ("facd-pipeline", "torch", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
                 "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def mount_point_of(path: Path) -> Path:
    """The mount point of the file system `path` lies on (bind mounts count, unlike for os.path.ismount)."""
    path = path.resolve()
    try:
        mounts = [Path(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        mounts = [p for p in (path, *path.parents) if os.path.ismount(p)]
    return max((m for m in mounts if path.is_relative_to(m)), key=lambda m: len(m.parts), default=Path("/"))


def check_writable(root: Path) -> None:
    """Before a run starts: its directory can be made and written and, where the environment names the runs volume
    (PIPELINE_RUNS_VOLUME, set in the Docker image), it lies on a mounted volume rather than in the container's own
    file system, where it would vanish with the container. Otherwise UserError says why; nothing is left behind."""
    volume = os.environ.get("PIPELINE_RUNS_VOLUME")
    if volume and mount_point_of(root) == Path("/"):
        raise UserError(f"no volume is mounted for {root}, so the run would vanish with the container: mount a "
                        f'folder you own, e.g. docker run -v "$PWD/runs:{volume}" ...')
    existed = root.is_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        if not existed and root.is_dir():
            root.rmdir()
        hint = f"; the folder mounted at {volume} must be writable by uid {os.getuid()}" if volume else ""
        raise UserError(f"cannot write the run directory {root}: {e.strerror} (uid {os.getuid()}){hint}") from None


SHA256 = re.compile(r"[0-9a-f]{64}")


def load_manifest(path: Path) -> dict[str, Any]:
    """A run's `manifest.json` (an empty one where there is none), every entry checked: `stages` maps a stage to its
    `key` (a string) and `outputs` (names, each an artifact), `artifacts` maps a name to its record with a `sha256`.
    A UserError naming the file and the entry otherwise."""
    if not path.exists():
        return {"stages": {}, "artifacts": {}}
    fix = "move it away to start the run afresh"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is corrupt ({e}); {fix}") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict)
            and isinstance(manifest.get("artifacts"), dict)):
        raise UserError(f"{path} is corrupt (no 'stages' and 'artifacts' tables); {fix}")
    for name, art in manifest["artifacts"].items():
        if not isinstance(art, dict) or not isinstance(art.get("sha256"), str) or not SHA256.fullmatch(art["sha256"]):
            raise UserError(f"{path}: artifacts.{name} is corrupt (not a record with a sha256); {fix}")
    for stage, entry in manifest["stages"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("outputs"), list)
                and all(isinstance(o, str) and o in manifest["artifacts"] for o in entry["outputs"])):
            raise UserError(f"{path}: stages.{stage} is corrupt (not a key and outputs recorded as artifacts); {fix}")
    return manifest


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def path(self, name: str) -> Path:
        return self.root / name

    def check_folder(self, must_exist: bool = False) -> None:
        """A UserError when the run directory is a file, or (`must_exist`) is missing; it is never created here."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--run-dir {self.root} is a file, not a run directory")
        if must_exist and not self.root.is_dir():
            raise UserError(f"no run directory {self.root} (mistyped --run-dir?)")

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK)

    @contextlib.contextmanager
    def lock(self, command: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the run directory's lock while `command` runs: exclusive for a writer (the folder is created, and
        temporaries a killed writer left are removed), shared for a reader (and none where the lock file cannot be
        opened: a read-only run directory that no writer ever locked). A second writer, or a reader while a writer
        holds it, waits up to LOCK_WAIT_S, then gets a UserError naming the holder."""
        path = self.path(LOCK)
        if shared:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                yield
                return
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                if not self.writable():
                    raise PermissionError(errno.EACCES, "read-only")
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write the run directory {self.root} ({e.strerror}); `pipeline {command}` "
                                "writes into it") from None
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
                        raise UserError(f"the run directory {self.root} is in use by {holder}; one command writes a "
                                        "run directory at a time: wait for it to finish") from None
                    time.sleep(0.05)
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} (`pipeline {command}`, since "
                              f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')})\n".encode(), 0)
                self._remove_temporaries()
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A stage's outputs as a set: the block writes each output into the yielded folder (private, inside the run
        directory) under its name relative to the run directory; when the block finishes, every file there is renamed
        into place (renames within one file system need no space). A failure before that leaves every earlier
        output as it was."""
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=STAGING_PREFIX))
        try:
            yield tmp
            for f in sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()):
                dest = self.root / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_temporaries(self) -> None:
        """What a killed writer left: staging folders and `.<name>.*.tmp` files (atomic writes, checkpoints)."""
        import shutil

        for tmp in self.root.glob(f"{STAGING_PREFIX}*"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
        for tmp in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    def _load(self) -> dict[str, Any]:
        return load_manifest(self.manifest_path)

    def _name(self, path: Path) -> str:
        """An input's name in keys and records: relative to the run directory, or (from elsewhere) its path."""
        path = Path(path).resolve()
        root = self.root.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    def _input_digests(self, inputs: list[Path]) -> dict[str, str]:
        not_files = [str(p) for p in inputs if not Path(p).is_file()]
        if not_files:
            raise UserError(f"{', '.join(not_files)}: not a file (a stage's input must be one)")
        return {self._name(p): sha256_file(p) for p in inputs}

    def stage_key(self, stage: str, config: dict[str, Any], inputs: list[Path]) -> str:
        """The key of `stage` with `config` and `inputs`; an input of this run that differs from its record in the
        manifest (changed after the stage that made it) is a UserError."""
        digests = self._input_digests(inputs)
        recorded = self._load()["artifacts"]
        changed = [name for name, digest in digests.items() if name in recorded and recorded[name]["sha256"] != digest]
        if changed:
            raise UserError(f"{stage}: {', '.join(changed)} in {self.root} differ(s) from the sha256 in {MANIFEST} "
                            "(changed after the stage that made it, or that stage was interrupted); redo that stage "
                            "first")
        return self._key(stage, config, digests)

    def _key(self, stage: str, config: dict[str, Any], digests: dict[str, str]) -> str:
        relative = {name: d for name, d in digests.items() if not Path(name).is_absolute()}
        external = sorted(d for name, d in digests.items() if Path(name).is_absolute())  # by content alone
        payload = {"stage": stage, "config": config, "inputs": relative, "external_inputs": external}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def recorded_sha256(self, name: str) -> str | None:
        art = self._load()["artifacts"].get(name)
        return None if art is None else art["sha256"]

    def is_recorded(self, stage: str, name: str) -> bool:
        """`name` is an output the manifest records for `stage`, and the file still has the recorded sha256."""
        path, digest = self.path(name), self.recorded_sha256(name)
        return (name in self._load()["stages"].get(stage, {}).get("outputs", []) and digest is not None
                and path.is_file() and sha256_file(path) == digest)

    def is_current(self, stage: str, key: str, outputs: list[str] | None = None) -> bool:
        """Same key, every recorded output unchanged, and (when given) the recorded outputs are `outputs`."""
        manifest = self._load()
        entry = manifest["stages"].get(stage)
        if entry is None or entry["key"] != key or (outputs is not None and set(entry["outputs"]) != set(outputs)):
            return False
        for name in entry["outputs"]:
            path, art = self.path(name), manifest["artifacts"].get(name)
            if art is None or not path.exists() or sha256_file(path) != art["sha256"]:
                return False
        return True

    def record(self, stage: str, key: str, config: dict[str, Any], inputs: list[Path], outputs: list[str]) -> None:
        """Record a finished stage and its output artifacts (names relative to the run directory). A UserError, with
        nothing recorded, when an input changed while the stage ran (its outputs would not match its inputs)."""
        digests = self._input_digests(inputs)
        if self._key(stage, config, digests) != key:
            raise UserError(f"{stage}: an input ({', '.join(digests) or 'none'}) changed while the stage ran; its "
                            f"outputs are not recorded in {MANIFEST}: run it again")
        manifest = self._load()
        made = {
            "stage": stage,
            "config": config,
            "inputs": digests,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for name in outputs:
            path = self.path(name)
            manifest["artifacts"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size, **made}
        manifest["stages"][stage] = {"key": key, "outputs": outputs}
        write_json_atomic(self.manifest_path, manifest)
