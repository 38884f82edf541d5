"""The run directory: every artifact of a run, and `manifest.json` recording how each one was made.

A stage declares its inputs (files) and the config it depends on; together they give the stage a key. When the
manifest holds the same key for the stage and every recorded output is still there with its recorded sha256, the
stage is up to date and is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

MANIFEST = "manifest.json"
# The artifacts the stages write, by name; every module that opens one takes its name from here.
STUDENT, CALIB = "student.pt", "calib.npz"
ONNX = {"fp32": "student.fp32.onnx", "fp16": "student.fp16.onnx",
        "int8": "student.int8.onnx",  # for TensorRT: S8S8 symmetric QDQ, FP16 rest
        "int8-cpu": "student.int8-cpu.onnx"}  # for ONNX Runtime on CPUs: U8S8 QDQ, FP32 rest
PLANS = {"fp16": "student.fp16.plan", "int8": "student.int8.plan"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def versions() -> dict[str, str]:
    """Versions of the package and of the dependencies that decide what an artifact contains."""
    out = {"python": platform.python_version()}
    for dist in ("facd-pipeline", "torch", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
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


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def path(self, name: str) -> Path:
        return self.root / name

    def _load(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}, "artifacts": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.manifest_path} is corrupt ({e}); move it away to start the run afresh") from None

    def stage_key(self, stage: str, config: dict[str, Any], inputs: list[Path]) -> str:
        payload = {"stage": stage, "config": config, "inputs": {str(p): sha256_file(p) for p in inputs}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

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
        """Record a finished stage and its output artifacts (names relative to the run directory)."""
        manifest = self._load()
        made = {
            "stage": stage,
            "config": config,
            "inputs": {str(p): sha256_file(p) for p in inputs},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for name in outputs:
            path = self.path(name)
            manifest["artifacts"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size, **made}
        manifest["stages"][stage] = {"key": key, "outputs": outputs}
        write_json_atomic(self.manifest_path, manifest)
