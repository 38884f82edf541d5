"""Build the CUDA kernel into a shared library with nvcc, cached by source hash and architectures.

The library (``contrastive.cu`` -> ``libfacd_contrastive.so``, CUDA runtime linked statically) is loaded with ctypes by
``kernels.cuda``; it needs no CUDA build of torch, and nvcc works without a GPU. Cache layout::

    $FACD_KERNEL_CACHE (default ~/.cache/facd-pipeline/kernels)/<hash>/libfacd_contrastive.so (+ build.log)

where <hash> covers the source, the nvcc flags and the target architectures. ``compile_report(arch)`` compiles one
architecture with ``-Xptxas -v`` and returns the register-spill bytes and warnings (the tests require none).

The tile sizes live in one place, the ``FACD_TILES`` table of the .cu file; ``tile_table()`` parses it so that the
PyTorch emulation (``kernels.emulate``) and the split heuristic use exactly the compiled configurations.

Environment overrides (used by the tuning experiment, benchmarks/kernel_tune.py): ``FACD_KERNEL_SOURCE`` (another
.cu file
with the same entry points, e.g. a copy with a different FACD_TILES table) and ``FACD_KERNEL_ARCHS`` (comma- or
space-separated, e.g. ``sm_90``: build only for the local GPU).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import astuple, dataclass
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("contrastive.cu")  # default source; see source_path()
LIBRARY_NAME = "libfacd_contrastive.so"
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
PTX_ARCH = "compute_90"  # embedded PTX, JIT-compiled by the driver on newer GPUs
NVCC_FLAGS = ("-O3", "-std=c++17", "--cudart", "static", "-Xcompiler", "-fPIC,-Wall,-Wextra")


class KernelUnavailable(RuntimeError):
    """The CUDA kernel cannot be used here (no nvcc, no GPU, unsupported device/shape, or a failed build/launch)."""


@dataclass(frozen=True)
class Tile:
    """One row of the FACD_TILES table (see the comment above it in the .cu): channels, 16-row MMA tiles per warp,
    warps per block, columns per K tile, min blocks per SM (launch bounds), Q fragments in registers, K tiles in
    flight, lazy-rescale threshold (0 = exact online max)."""

    channels: int
    warp_mtiles: int
    warps: int
    block_cols: int
    min_blocks: int = 1
    q_in_registers: int = 1
    stages: int = 2
    lazy_rescale: int = 0

    @property
    def block_rows(self) -> int:
        return 16 * self.warp_mtiles * self.warps

    def smem_bytes(self, element_size: int = 2) -> int:
        """Dynamic shared memory of the partial kernel: the Q tile plus ``stages`` K tiles, rows padded by 8."""
        return (self.block_rows + self.stages * self.block_cols) * (self.channels + 8) * element_size

    def row(self) -> str:
        """The table row for this configuration, as it appears in the .cu (X(...) without the continuation)."""
        return "X({})".format(", ".join(str(v) for v in astuple(self)))


def source_path() -> Path:
    """The kernel source: $FACD_KERNEL_SOURCE if set, else kernels/contrastive.cu."""
    override = os.environ.get("FACD_KERNEL_SOURCE")
    return Path(override) if override else SOURCE


def default_archs() -> tuple[str, ...]:
    """Target architectures: $FACD_KERNEL_ARCHS (comma- or space-separated) if set, else DEFAULT_ARCHS."""
    override = os.environ.get("FACD_KERNEL_ARCHS", "").replace(",", " ").split()
    return tuple(override) or DEFAULT_ARCHS


_TABLE = re.compile(r"#define FACD_TILES\(X\)((?:.*\\\n)*.*\n)")
_ROW = re.compile(r"X\(\s*(\d+(?:\s*,\s*\d+){3,7})\s*\)")


def parse_tile_table(text: str) -> dict[int, Tile]:
    """The FACD_TILES rows of a kernel source text (4 to 8 integers each; missing trailing columns take defaults)."""
    body = _TABLE.search(text)
    if body is None:
        raise RuntimeError("FACD_TILES table not found in the kernel source")
    rows = [tuple(int(v) for v in row.split(",")) for row in _ROW.findall(body.group(1))]
    return {row[0]: Tile(*row) for row in rows}


def replace_tile_table(text: str, tiles: list[Tile]) -> str:
    """``text`` with its FACD_TILES table replaced by ``tiles`` (for variants of the kernel)."""
    body = "".join(f"    {tile.row()} \\\n" for tile in tiles).rstrip(" \\\n") + "\n"
    match = _TABLE.search(text)
    if match is None:
        raise RuntimeError("FACD_TILES table not found in the kernel source")
    return text[: match.start()] + "#define FACD_TILES(X) \\\n" + body + text[match.end() :]


def tile_table(source: Path | None = None) -> dict[int, Tile]:
    """The kernel's tile configurations by (padded) channel count, parsed from the FACD_TILES table of the source."""
    return _tile_table(str(source or source_path()))


@cache
def _tile_table(source: str) -> dict[int, Tile]:
    return parse_tile_table(Path(source).read_text())


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


def library_path(archs: tuple[str, ...] | None = None, source: Path | None = None) -> Path:
    """Where the library for these architectures lives in the cache (whether or not it is built)."""
    key = hashlib.sha256()
    key.update((source or source_path()).read_bytes())
    key.update(repr((NVCC_FLAGS, _gencode(tuple(archs or default_archs())))).encode())
    return cache_root() / key.hexdigest()[:16] / LIBRARY_NAME


def build_kernel(
    archs: tuple[str, ...] | list[str] | None = None,
    force: bool = False,
    verbose: bool = False,
    source: Path | None = None,
) -> Path:
    """Compile the kernel library for ``archs`` (default: sm_80, 86, 87, 89, 90 + compute_90 PTX) unless cached.

    Returns the path of the shared library. The build goes to a temporary file that is renamed into place, so
    concurrent builders never see a partial library. Raises KernelUnavailable when nvcc is missing or fails.
    ``source`` defaults to ``source_path()``, ``archs`` to ``default_archs()``.
    """
    archs = tuple(archs or default_archs())
    source = source or source_path()
    target = library_path(archs, source)
    if target.is_file() and not force:
        return target
    nvcc = find_nvcc()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [
        nvcc,
        *NVCC_FLAGS,  # no --threads: its parallel device link failed once on a GPU machine (nvlink tmp file missing)
        *_gencode(archs),
        "-shared",
        "-o",
        tmp,
        str(source),
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


def compile_report(arch: str, source: Path | None = None) -> tuple[str, int, list[str]]:
    """Compile (host and device code) for one architecture with ``-Xptxas -v``.

    Returns (log, spill bytes summed over all kernels, warning lines). Raises KernelUnavailable if nvcc is missing
    and RuntimeError if compilation fails.
    """
    nvcc = find_nvcc()
    source = source or source_path()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", *_gencode((arch,))[:1], "-c", "-o", f"{tmp}/k.o", str(source)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch} (exit {result.returncode}):\n{log[-4000:]}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    return log, spills, warnings
