"""Build the CUDA kernel into a shared library with nvcc, cached by source hash and architectures.

The library (``contrastive.cu`` -> ``libfacd_contrastive.so``, CUDA runtime linked statically) is loaded with ctypes by
``kernels.cuda``; it needs no CUDA build of torch, and nvcc works without a GPU. Cache layout::

    $FACD_KERNEL_CACHE (default ~/.cache/facd-pipeline/kernels)/<hash>/libfacd_contrastive.so (+ build.log)

where <hash> covers the source, the nvcc flags and the target architectures. ``compile_report(arch)`` compiles one
architecture with ``-Xptxas -v`` and returns the register-spill bytes and warnings (the tests require none).

The tile sizes live in one place, the ``FACD_TILES`` table of the .cu file; ``tile_table()`` parses it so that the
PyTorch emulation (``kernels.emulate``) and the split heuristic use exactly the compiled configurations.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("contrastive.cu")
LIBRARY_NAME = "libfacd_contrastive.so"
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
PTX_ARCH = "compute_90"  # embedded PTX, JIT-compiled by the driver on newer GPUs
NVCC_FLAGS = ("-O3", "-std=c++17", "--cudart", "static", "-Xcompiler", "-fPIC,-Wall,-Wextra")


class KernelUnavailable(RuntimeError):
    """The CUDA kernel cannot be used here (no nvcc, no GPU, unsupported device/shape, or a failed build/launch)."""


@dataclass(frozen=True)
class Tile:
    """One row of the FACD_TILES table: channels, 16-row MMA tiles per warp, warps per block, columns per K tile."""

    channels: int
    warp_mtiles: int
    warps: int
    block_cols: int

    @property
    def block_rows(self) -> int:
        return 16 * self.warp_mtiles * self.warps


@cache
def tile_table() -> dict[int, Tile]:
    """The kernel's tile configurations by (padded) channel count, parsed from the FACD_TILES table of the source."""
    text = SOURCE.read_text()
    body = re.search(r"#define FACD_TILES\(X\)((?:.*\\\n)*.*\n)", text)
    if body is None:
        raise RuntimeError(f"FACD_TILES table not found in {SOURCE}")
    rows = re.findall(r"X\((\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)", body.group(1))
    return {int(c): Tile(int(c), int(mt), int(w), int(bn)) for c, mt, w, bn in rows}


def find_nvcc() -> str:
    """Path of nvcc: $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin; KernelUnavailable if none."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"] if os.environ.get("CUDA_HOME") else []
    on_path = shutil.which("nvcc")
    candidates += [Path(on_path)] if on_path else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH) - cannot build the CUDA kernel")


def cache_root() -> Path:
    """Root of the build cache: $FACD_KERNEL_CACHE, else ~/.cache/facd-pipeline/kernels."""
    override = os.environ.get("FACD_KERNEL_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "facd-pipeline" / "kernels"


def _gencode(archs: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in archs:
        if not re.fullmatch(r"sm_\d+[af]?", arch):
            raise ValueError(f"architecture must look like 'sm_90', got {arch!r}")
        flags.append(f"-gencode=arch=compute_{arch[3:]},code={arch}")
    if PTX_ARCH:
        flags.append(f"-gencode=arch={PTX_ARCH},code={PTX_ARCH}")
    return flags


def library_path(archs: tuple[str, ...] = DEFAULT_ARCHS) -> Path:
    """Where the library for these architectures lives in the cache (whether or not it is built)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(repr((NVCC_FLAGS, _gencode(tuple(archs)))).encode())
    return cache_root() / key.hexdigest()[:16] / LIBRARY_NAME


def build_kernel(archs: tuple[str, ...] | list[str] | None = None, force: bool = False, verbose: bool = False) -> Path:
    """Compile the kernel library for ``archs`` (default: sm_80, 86, 87, 89, 90 + compute_90 PTX) unless cached.

    Returns the path of the shared library. The build goes to a temporary file that is renamed into place, so
    concurrent builders never see a partial library. Raises KernelUnavailable when nvcc is missing or fails.
    """
    archs = tuple(archs or DEFAULT_ARCHS)
    target = library_path(archs)
    if target.is_file() and not force:
        return target
    nvcc = find_nvcc()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [
        nvcc,
        *NVCC_FLAGS,
        "--threads",
        str(os.cpu_count() or 1),
        *_gencode(archs),
        "-shared",
        "-o",
        tmp,
        str(SOURCE),
    ]
    if verbose:
        print(" ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    (target.parent / "build.log").write_text(" ".join(cmd) + "\n" + result.stdout + result.stderr)
    if result.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"nvcc failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    if verbose and (result.stdout or result.stderr):
        print(result.stdout + result.stderr, flush=True)
    os.replace(tmp, target)
    return target


def compile_report(arch: str) -> tuple[str, int, list[str]]:
    """Compile (host and device code) for one architecture with ``-Xptxas -v``.

    Returns (log, spill bytes summed over all kernels, warning lines). Raises KernelUnavailable if nvcc is missing
    and RuntimeError if compilation fails.
    """
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", *_gencode((arch,))[:1], "-c", "-o", f"{tmp}/k.o", str(SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch} (exit {result.returncode}):\n{log[-4000:]}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    return log, spills, warnings
