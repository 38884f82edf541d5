"""Tuning experiment for the fused kernel on a GPU: ``python benchmarks/kernel_tune.py --out DIR``
(benchmarks/kernel_tune.sh).

Each variant is kernels/contrastive.cu with its FACD_TILES table replaced by one row (``VARIANTS``); each C's
``c{C}-base`` row (the tile before tuning) is the control. Steps:

1. build every variant library for the local GPU's architecture only, in parallel (cached in $FACD_KERNEL_CACHE);
2. one worker process runs the baselines (naive, SDPA with V = K, cuBLAS Q K^T; fp16, forward + backward) and then,
   per variant: registers / local (spill) bytes / blocks per SM from the driver; correctness gates (fp16, bf16 and
   fp32 inputs against the float64 oracle with the GPU tests' criterion, incl. a masked related case that exercises
   the lazy rescale; raw kernel vs the CPU emulation); CUDA-event timings at N = M = --n, fp16: the raw kernel
   (partial + combine) for several column-split counts, then forward + backward through the CUDA loss path with
   PyTorch pre/post ops (``unfused``, as contrastive_loss today) and with the fused row kernels (``fused``) at the
   heuristic's and the best split count. A crashed or hung worker is replaced (the variant in flight is recorded as
   failed); the C = 64 control (c64-base) runs again last to show drift; finally a profiler breakdown (GPU time per
   kernel group) of one step per mode for each C's control and two fastest other variants (last: CUPTI may slow
   later launches);
3. writes tune.jsonl (results as they come), tune.json and tune_summary.txt (the winner per C and its FACD_TILES row).

Switching the default to a winner: paste the printed X(...) row over the row with the same C in FACD_TILES of
kernels/contrastive.cu; if ``fused`` is faster, set FUSED_PRE_POST = True in kernels/cuda.py.

``python benchmarks/kernel_tune.py --compile-check`` (no GPU): compiles every variant for all default architectures
and reports
registers and spills (the default table must stay spill-free everywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kernels import build
from kernels.build import Tile

TAU = 0.07
SMEM_LIMIT = 99 * 1024  # every target (sm_86 / sm_89: 99 KB per block)

# name -> (channels, FACD_TILES row, what it tests); c{C}-base, the tile before tuning, is each C's control
VARIANTS: dict[str, tuple[int, Tile, str]] = {
    "c64-base": (64, Tile(64, 2, 4, 64, 1, 1, 2, 0), "control: the tile before tuning (128x64, 1 barrier per K tile)"),
    "c64-lazy": (64, Tile(64, 2, 4, 64, 1, 1, 2, 8), "+ lazy rescale of O (threshold 2^8)"),
    "c64-lazy-3st": (64, Tile(64, 2, 4, 64, 1, 1, 3, 8), "+ 3 K stages"),
    "c64-bn32-3blk": (64, Tile(64, 2, 4, 32, 3, 0, 2, 8), "BN 32, Q from smem, <= 168 regs: 3 blocks/SM"),
    "c64-bn32-3blk-3st": (64, Tile(64, 2, 4, 32, 3, 0, 3, 8), "same, 3 K stages"),
    "c64-bn32": (64, Tile(64, 2, 4, 32, 1, 1, 2, 8), "BN 32, Q in registers, 2 blocks/SM"),
    "c64-8w16r": (64, Tile(64, 1, 8, 64, 2, 1, 2, 8), "8 warps x 16 rows (BM 128), 128 regs: 16 warps/SM"),
    "c64-4w16r": (64, Tile(64, 1, 4, 64, 4, 1, 2, 8), "4 warps x 16 rows (BM 64), 128 regs: 16 warps/SM"),
    "c64-8w32r": (64, Tile(64, 2, 8, 64, 1, 1, 2, 8), "8 warps x 32 rows (BM 256), 1 block/SM"),
    "c64-8w16r-bn128": (64, Tile(64, 1, 8, 128, 1, 1, 2, 8), "8 warps x 16 rows, BN 128"),
    "c64-4w16r-bn128": (64, Tile(64, 1, 4, 128, 2, 1, 2, 8), "4 warps x 16 rows (BM 64), BN 128"),
    "c256-base": (256, Tile(256, 1, 4, 32, 1, 0, 2, 0), "control: the tile before tuning (64x32, Q from smem)"),
    "c256-lazy": (256, Tile(256, 1, 4, 32, 1, 0, 2, 8), "+ lazy rescale (saves 128 FMUL per thread per tile)"),
    "c256-lazy-qreg": (256, Tile(256, 1, 4, 32, 1, 1, 2, 8), "+ Q fragments in registers (-20% ldmatrix)"),
    "c256-lazy-3st": (256, Tile(256, 1, 4, 32, 1, 0, 3, 8), "+ 3 K stages"),
    "c256-bn16-qreg": (256, Tile(256, 1, 4, 16, 1, 1, 2, 8), "BN 16, Q in registers, lazy"),
}
SPLITS = (1, 2, 3, 4, 6, 8)
WORKER_PYTHON = sys.executable  # (a test substitutes a fake worker)
TABLE = {"float16": (1.8e-5, 7.4e-4), "bfloat16": (1.3e-4, 5.5e-3)}  # notes' tolerance table (loss, grad)
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


# ---- building ------------------------------------------------------------------------------------------------------


def variant_source(name: str, root: Path) -> Path:
    """The .cu file of a variant (written under ``root``)."""
    _, tile, _ = VARIANTS[name]
    path = root / f"{name}.cu"
    text = build.replace_tile_table(build.SOURCE.read_text(), [tile])
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def build_all(names: list[str], archs: tuple[str, ...], root: Path) -> dict[str, dict]:
    """Build the variants' libraries in parallel; name -> {source, library, seconds} or {error}."""
    sources = {name: variant_source(name, root) for name in names}

    def one(source: Path) -> dict:
        start = time.perf_counter()
        try:
            lib = build.build_kernel(archs=archs, source=source)
        except Exception as exc:  # reported per variant; the others still run
            return {"error": repr(exc)[-3000:]}
        return {"library": str(lib), "seconds": round(time.perf_counter() - start, 1)}

    unique = sorted(set(sources.values()))
    with ThreadPoolExecutor(max_workers=max(1, min(len(unique), os.cpu_count() or 1))) as pool:
        built = dict(zip(unique, pool.map(one, unique)))
    return {name: {"source": str(src), **built[src]} for name, src in sources.items()}


def compile_check(names: list[str], root: Path) -> list[dict]:
    """Registers and spill bytes of each variant's fp16 / bf16 partial kernels for every default architecture."""
    jobs = [(name, arch) for name in names for arch in build.DEFAULT_ARCHS]

    def one(job):
        name, arch = job
        log, spills, warnings = build.compile_report(arch, variant_source(name, root))
        regs = re.findall(r"Function properties for \S*partial_kernel\S*\n.*\n.*?Used (\d+) registers", log)
        return {"name": name, "arch": arch, "spill_bytes": spills, "warnings": len(warnings), "registers": regs}

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, jobs))


def gpu_arch() -> str:
    """sm_XY of GPU 0 from nvidia-smi (no CUDA context in the parent); sm_90 if it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=30,
        ).stdout.split()  # fmt: skip
        major, minor = out[0].split(".")
        return f"sm_{int(major)}{int(minor)}"
    except Exception:
        return "sm_90"


# ---- the worker (runs on the GPU) ----------------------------------------------------------------------------------


def _emit(kind: str, payload) -> None:
    print(f"@@{kind} {json.dumps(payload)}", flush=True)


def _select(source: str) -> None:
    """Make ``source`` the kernel of this process (library, tile table, occupancy cache)."""
    from kernels import cuda

    os.environ["FACD_KERNEL_SOURCE"] = source
    cuda.reset_library()


def _inputs(n, m, c, *, seed, related=False):
    import torch

    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=gen, dtype=torch.float64)
    t = torch.randn(m, c, generator=gen, dtype=torch.float64)
    if related:  # teacher rows = student rows + noise: the positive stands out (exercises the lazy rescale)
        t += s[torch.arange(m) % n]
    pos = torch.arange(n) if n == m else torch.randint(0, m, (n,), generator=gen)
    return s.cuda(), t.cuda(), pos.cuda()


def _loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_()
    loss = fn(s)
    loss.backward()
    return loss.double().item(), s.grad.double()


def _rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


_REFERENCES: dict = {}


def oracle_check(case: tuple, dtype, fused: bool) -> dict:
    """The GPU tests' criterion: kernel error vs the float64 oracle <= 2x plain PyTorch in the operand dtype + the
    table value, and <= 4x the table value (scaled for small tau / small N)."""
    import torch

    from kernels import cuda
    from kernels.contrastive import naive_loss, validate

    n, m, c, rows_per_image, weighted, tau, related = case
    s, t, pos = _inputs(n, m, c, seed=4, related=related)
    s, t = s.to(dtype), t.to(dtype)
    weight = torch.rand(n, generator=torch.Generator().manual_seed(5)).cuda() if weighted else None
    op = torch.float16 if dtype == torch.float32 else dtype
    kw = dict(tau=tau, pos=pos, rows_per_image=rows_per_image)
    if (case, dtype) not in _REFERENCES:  # (the same for every variant and both modes)
        _REFERENCES.clear()  # keep one case's oracle on the GPU at a time
        _REFERENCES[case, dtype] = (
            _loss_and_grad(lambda x: naive_loss(x, t.double(), weight=weight, **kw), s.double()),
            _loss_and_grad(
                lambda x: naive_loss(x, t.to(op), weight=None if weight is None else weight.to(op), **kw), s.to(op)
            ),
        )
    ref, plain = _REFERENCES[case, dtype]

    def kernel_fn(x):
        p = validate(x, t, tau, pos, rows_per_image, weight)
        return cuda.kernel_loss(x, t, p, tau=tau, rows_per_image=rows_per_image, weight=weight, fused=fused)

    got = _loss_and_grad(kernel_fn, s)
    (k_loss, k_grad), (p_loss, p_grad) = [(abs(r[0] - ref[0]), _rel_err(r[1], ref[1])) for r in (got, plain)]
    scale = max(1.0, 0.07 / tau) * math.sqrt(max(1.0, 4096 / n))
    table_loss, table_grad = TABLE[str(op).removeprefix("torch.")]
    ok = (
        bool(torch.isfinite(got[1]).all())
        and k_loss <= 2 * p_loss + table_loss
        and k_loss <= 4 * table_loss * scale
        and k_grad <= 2 * p_grad + table_grad
        and k_grad <= 4 * table_grad * scale
    )
    return {"ok": ok, "loss_err": k_loss, "grad_err": k_grad, "torch_loss_err": p_loss, "torch_grad_err": p_grad}


def emulation_check(case: tuple, dtype) -> dict:
    """Raw kernel vs its CPU emulation (same tiles and splits): loss / lse <= 1e-4, gradient <= u/2 relative."""
    import torch

    from kernels import cuda
    from kernels.contrastive import normalize_rows
    from kernels.emulate import emulate_kernel

    n, m, c, rows_per_image, splits = case
    s, t, _ = _inputs(n, m, c, seed=1)
    pos = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2)).cuda()
    weight = torch.rand(n, generator=torch.Generator().manual_seed(3)).cuda()
    q, k = normalize_rows(s).float(), normalize_rows(t).float()
    got = cuda.forward(q.to(dtype), k.to(dtype), pos, tau=0.1, rows_per_image=rows_per_image, weight=weight,
                       splits=splits)  # fmt: skip
    want = emulate_kernel(q.cpu(), k.cpu(), pos.cpu(), tau=0.1, rows_per_image=rows_per_image, weight=weight.cpu(),
                          dtype=dtype, splits=splits)  # fmt: skip
    loss_err, lse_err = ((g.cpu() - w).abs().max().item() for g, w in zip(got[:2], want[:2]))
    grad_err = _rel_err(got[2].cpu(), want[2])
    ok = bool(torch.isfinite(got[2]).all()) and loss_err <= 1e-4 and lse_err <= 1e-4
    ok = ok and grad_err <= UNIT_ROUNDOFF[str(dtype).removeprefix("torch.")] / 2
    return {"ok": ok, "loss_err": loss_err, "lse_err": lse_err, "grad_err": grad_err}


def correctness(c: int, fused_available: bool) -> dict:
    import torch

    if c <= 64:
        oracle_cases = {  # n, m, c, rows_per_image, weighted, tau, related
            "table": (4096, 4096, 64, None, False, 0.07, False),
            "related masked": (4096, 4096, 64, 1024, False, 0.07, True),
            "ragged weighted C=40": (3000, 2500, 40, 500, True, 0.07, False),
        }
        emulation_cases = {"ragged masked": (1000, 777, 64, 128, 2), "tiles": (256, 256, 64, None, 1)}
    else:
        oracle_cases = {
            "table": (1500, 1500, 256, 300, False, 0.07, False),
            "related masked": (2048, 2048, 256, 512, False, 0.07, True),
            "ragged weighted": (1200, 1000, 256, None, True, 0.07, False),
        }
        emulation_cases = {"ragged masked": (150, 300, 256, 50, 3), "tiles": (128, 256, 256, None, 2)}
    checks = {}
    for name, case in oracle_cases.items():
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if name == "table" else (torch.float16,)
        for dtype in dtypes:
            for fused in (False, True) if fused_available else (False,):
                key = f"oracle {name} {str(dtype).removeprefix('torch.')} {'fused' if fused else 'unfused'}"
                checks[key] = oracle_check(case, dtype, fused)
    for name, case in emulation_cases.items():
        for dtype in (torch.float16, torch.bfloat16):
            checks[f"emulation {name} {str(dtype).removeprefix('torch.')}"] = emulation_check(case, dtype)
    return {"ok": all(v["ok"] for v in checks.values()), "checks": checks}


def profile_step(step, repeats: int = 3) -> dict:
    """GPU time per step by kernel group (partial, combine, fused row kernels, other PyTorch kernels), in us."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    counts: dict[str, int] = {}
    others: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        name = evt.name
        group = next((g for g in ("partial_kernel", "combine_kernel", "prepare_kernel", "scale_backward_kernel")
                      if g in name), "other")  # fmt: skip
        us = evt.time_range.elapsed_us()
        groups[group] = groups.get(group, 0.0) + us / repeats
        counts[group] = counts.get(group, 0) + 1
        if group == "other":
            short = name[:60]
            others[short] = others.get(short, 0.0) + us / repeats
    top = dict(sorted(others.items(), key=lambda kv: -kv[1])[:8])
    return {
        "gpu_us_per_step": {k: round(v, 1) for k, v in groups.items()},
        "kernels_per_step": {k: v / repeats for k, v in counts.items()},
        "gpu_busy_us": round(sum(groups.values()), 1),
        "top_other_us": {k: round(v, 1) for k, v in top.items()},
    }


def time_interleaved(steps: dict, warmup: int, iters: int) -> dict:
    """CUDA-event p10/p50/p90 (ms) of each step, the steps interleaved; a step that raises is reported and dropped."""
    from kernels.bench import interleaved_times

    out, live = {}, {}
    for name, step in steps.items():
        try:
            step()
            live[name] = step
        except Exception as exc:
            out[name] = {"error": repr(exc)[:500]}
    for _ in range(warmup):
        for step in live.values():
            step()
    out.update(interleaved_times(live, iters))
    return out


def run_variant(name: str, n: int, warmup: int, iters: int, checks: bool = True) -> dict:
    import torch

    from kernels import cuda
    from kernels.bench import extra_memory
    from kernels.emulate import kernel_tile

    c, _, note = VARIANTS[name]
    lib = cuda.library()
    fused_available = hasattr(lib, "facd_prepare")
    result = {"name": name, "c": c, "note": note, "library": str(build.library_path())}
    tile = kernel_tile(c)
    result["row"] = tile.row()
    result["info"] = {
        str(d).removeprefix("torch."): cuda.kernel_info(lib, d, c, 0) for d in (torch.float16, torch.bfloat16)
    }
    start = time.perf_counter()
    result["correctness"] = correctness(c, fused_available) if checks else {"ok": True, "checks": {}}
    result["correctness_s"] = round(time.perf_counter() - start, 1)

    props = torch.cuda.get_device_properties(0)
    s, t, full = _timing_inputs(c, n)
    pos = torch.arange(n, device="cuda")
    q = torch.nn.functional.normalize(s.detach().float(), dim=1).half()
    k = torch.nn.functional.normalize(t.float(), dim=1).half()
    heuristic = cuda.choose_splits(n, n, tile, props.multi_processor_count, result["info"]["float16"]["blocks_per_sm"])
    result["heuristic_splits"] = heuristic
    sweep = sorted(set(SPLITS) | {heuristic})

    def raw(splits):
        def step():
            cuda.forward(q, k, pos, tau=TAU, splits=splits)

        return step

    result["raw"] = time_interleaved({str(sp): raw(sp) for sp in sweep}, max(3, warmup // 2), max(20, iters // 2))
    timed = {sp: r["p50_ms"] for sp, r in result["raw"].items() if "p50_ms" in r}
    best = int(min(timed, key=timed.get)) if timed else heuristic
    result["best_raw_splits"] = best

    steps = {}
    for fused in (False, True) if fused_available else (False,):
        for sp in dict.fromkeys((heuristic, best)):
            steps[f"{'fused' if fused else 'unfused'}/{sp}"] = full(fused, sp)
    result["fwd_bwd"] = time_interleaved(steps, warmup, iters)
    for key, step in steps.items():
        if "p50_ms" in result["fwd_bwd"][key]:
            result["fwd_bwd"][key]["extra_mib"] = extra_memory(step)[0]
            result["fwd_bwd"][key]["loss"] = step().item()
    return result


def _timing_inputs(c: int, n: int):
    """fp16 student (with grad) and teacher rows of the timings, and full(fused, splits) -> one fwd + bwd step."""
    import torch

    from kernels import cuda
    from kernels.bench import loss_step
    from kernels.contrastive import validate

    gen = torch.Generator(device="cuda").manual_seed(n + c)
    s = torch.randn(n, c, device="cuda", dtype=torch.float16, generator=gen).requires_grad_()
    t = torch.randn(n, c, device="cuda", dtype=torch.float16, generator=gen)

    def full(fused, splits):
        def fn():
            p = validate(s, t, TAU, None, None, None)
            return cuda.kernel_loss(s, t, p, tau=TAU, rows_per_image=None, weight=None, splits=splits, fused=fused)

        return loss_step(s, fn)

    return s, t, full


def run_profile(name: str, n: int, splits: int) -> dict:
    """Profiler breakdown of one fwd + bwd step per mode (run after all timings: CUPTI may slow later launches)."""
    from kernels import cuda

    c = VARIANTS[name][0]
    _, _, full = _timing_inputs(c, n)
    out = {}
    for mode in ("unfused", "fused") if hasattr(cuda.library(), "facd_prepare") else ("unfused",):
        try:
            step = full(mode == "fused", splits)
            step()  # (warm)
            out[mode] = profile_step(step)
        except Exception as exc:  # diagnostic only
            out[mode] = {"error": repr(exc)[:300]}
    return {"name": f"profile:{name}:{splits}", "splits": splits, "profile": out}


def run_baselines(n: int, channels: list[int], warmup: int, iters: int) -> dict:
    """naive / SDPA (V = K) / cuBLAS Q K^T at N = M = n, fp16, forward + backward (kernels.bench's providers)."""
    import torch
    import torch.nn.functional as F

    from kernels.bench import loss_step, naive_fits, sdpa_loss

    rows = {}
    for c in channels:
        gen = torch.Generator(device="cuda").manual_seed(n + c)
        s = torch.randn(n, c, device="cuda", dtype=torch.float16, generator=gen).requires_grad_()
        t = torch.randn(n, c, device="cuda", dtype=torch.float16, generator=gen)
        pos = torch.arange(n, device="cuda")
        q, k = F.normalize(s.detach(), dim=1), F.normalize(t, dim=1)
        steps = {
            "sdpa": loss_step(s, lambda: sdpa_loss(s, t, TAU)),
            "cublas": lambda: torch.mm(q, k.T),
        }
        if naive_fits(n, torch.float16):
            steps["naive"] = loss_step(
                s, lambda: F.cross_entropy(F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / TAU, pos)
            )
        rows[str(c)] = time_interleaved(steps, warmup, iters)
        del s, t, q, k, steps
        torch.cuda.empty_cache()
    return rows


def worker(names: list[str], n: int, warmup: int, iters: int, roots: dict[str, str]) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    _emit("DEVICE", {"name": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability())})  # fmt: skip
    for name in names:
        _emit("START", name)
        start = time.perf_counter()
        try:
            if name == "baselines":
                result = {"name": name, "rows": run_baselines(n, [64, 256], warmup, iters)}
            elif name.startswith("profile:"):
                _, base, splits = name.split(":")
                _select(roots[base])
                result = run_profile(base, n, int(splits))
            else:
                base = name.removesuffix("@end")
                _select(roots[base])
                result = run_variant(base, n, warmup, iters, checks=base == name)
                result["name"] = name
        except Exception as exc:
            import traceback

            base = name.split(":")[1] if name.startswith("profile:") else name.removesuffix("@end")
            _emit("RESULT", {"name": name, "c": VARIANTS.get(base, (0,))[0], "error": repr(exc)[:1500],
                             "trace": traceback.format_exc()[-3000:]})  # fmt: skip
            sys.exit(3)  # a CUDA error may have poisoned the context: the parent starts a fresh worker
        result["seconds"] = round(time.perf_counter() - start, 1)
        _emit("RESULT", result)
        torch.cuda.empty_cache()


# ---- the parent: schedule workers, summarise ----------------------------------------------------------------------


def best_fwd_bwd(result: dict, mode: str) -> tuple[float, str] | None:
    rows = {k: v for k, v in result.get("fwd_bwd", {}).items() if k.startswith(mode + "/") and "p50_ms" in v}
    if not rows:
        return None
    key = min(rows, key=lambda k: rows[k]["p50_ms"])
    return rows[key]["p50_ms"], key.split("/")[1]


def at_heuristic(result: dict, mode: str) -> float | None:
    """fwd + bwd p50 at the split count the heuristic picks: what adopting the row gives with no other change."""
    return result.get("fwd_bwd", {}).get(f"{mode}/{result.get('heuristic_splits')}", {}).get("p50_ms")


def eligible(result: dict) -> tuple[bool, str]:
    """Adoptable as a default row: correct, spill-free on this GPU, shared memory within every target's 99 KB."""
    if "error" in result:
        return False, "error"
    if not result.get("correctness", {}).get("ok"):
        failed = [k for k, v in result.get("correctness", {}).get("checks", {}).items() if not v["ok"]]
        return False, "failed: " + ", ".join(failed)[:200]
    info = result.get("info", {}).get("float16", {})
    if info.get("local_bytes", 0) > 0:
        return False, f"local memory {info['local_bytes']} B (spills)"
    if info.get("smem_bytes", 0) > SMEM_LIMIT:
        return False, f"shared memory {info['smem_bytes']} B > 99 KB"
    return True, ""


def summarize(report: dict) -> str:
    lines = [f"device: {report.get('device')}", f"N = M = {report['n']}, fp16, tau = {TAU}, fwd + bwd p50 in ms"]
    base = report["results"].get("baselines", {}).get("rows", {})
    for c in (64, 256):
        b = base.get(str(c), {})
        bl = {k: v.get("p50_ms") for k, v in b.items()}
        lines.append("")
        lines.append(f"== C = {c}: baselines " + ", ".join(f"{k} {v}" for k, v in bl.items()))
        header = f"{'variant':22} {'regs':>4} {'lmem':>4} {'blk/SM':>6} {'heur':>4} {'raw@h':>7} {'unfus@h':>7} " \
                 f"{'fused@h':>7} {'best (splits)':>18} {'check':>5}  row / note"  # fmt: skip
        lines.append(header)
        ranked = []
        for name, r in report["results"].items():
            if r.get("c") != c or name.endswith("@end"):
                continue
            if "error" in r:
                lines.append(f"{name:22} ERROR {r['error'][:150]}")
                continue
            info = r.get("info", {}).get("float16", {})
            raw = r["raw"].get(str(r["heuristic_splits"]), {}).get("p50_ms")
            unf, fus = at_heuristic(r, "unfused"), at_heuristic(r, "fused")
            best = min(((v, m) for m in ("unfused", "fused") for v in [best_fwd_bwd(r, m)] if v), default=None)
            best_text = f"{best[0][0]} {best[1][:3]} ({best[0][1]})" if best else "-"
            ok, why = eligible(r)
            lines.append(
                f"{name:22} {info.get('registers', '?'):>4} {info.get('local_bytes', '?'):>4} "
                f"{info.get('blocks_per_sm', '?'):>6} {r['heuristic_splits']:>4} {raw or '-':>7} {unf or '-':>7} "
                f"{fus or '-':>7} {best_text:>18} {'ok' if r['correctness']['ok'] else 'FAIL':>5}  {r['row']}  "
                f"{r['note']}" + (f" [{why}]" if why else "")
            )
            if ok:  # (the control too: the tile before tuning may still be the fastest)
                for mode, ms in (("unfused", unf), ("fused", fus)):
                    if ms:
                        ranked.append((ms, name, mode, r["heuristic_splits"], r))
        if not ranked:
            lines.append("no eligible variant")
            continue
        ranked.sort(key=lambda x: x[0])
        ms, name, mode, splits, r = ranked[0]
        control = report["results"].get(f"c{c}-base")
        control_ms = at_heuristic(control, "unfused") if control else None
        versus = f" vs control {control_ms} ms ({control_ms / ms:.2f}x)" if control_ms else ""
        lines.append(f"winner C={c}: {name} ({mode}, heuristic splits {splits}): {ms} ms{versus}")
        best = best_fwd_bwd(r, mode)
        if best and str(best[1]) != str(splits):
            lines.append(f"  note: {best[1]} splits would give {best[0]} ms (the heuristic picks {splits})")
        if bl.get("naive"):
            lines.append(f"  naive / kernel: {bl['naive'] / ms:.2f} (target >= 8)")
        if bl.get("cublas"):
            lines.append(f"  kernel / cublas: {ms / bl['cublas']:.2f} (target <= 1.5)")
        if bl.get("sdpa"):
            lines.append(f"  sdpa / kernel: {bl['sdpa'] / ms:.2f} (target >= 1)")
        extra = r["fwd_bwd"].get(f"{mode}/{splits}", {}).get("extra_mib")
        lines.append(f"  extra memory: {extra} MiB (target < 64)")
        for who, res in (("winner", r), ("control", control if control is not r else None)):
            for m, prof in (res or {}).get("profile", {}).items():
                if isinstance(prof, dict) and "gpu_us_per_step" in prof:
                    lines.append(f"  profile {who} {m} (splits {res.get('profile_splits')}): GPU us/step "
                                 f"{prof['gpu_us_per_step']} kernels/step {prof['kernels_per_step']}")  # fmt: skip
        lines.append(f"  to adopt: replace the C={c} row of FACD_TILES in kernels/contrastive.cu with")
        lines.append(f"      {r['row']}")
        if mode == "fused":
            lines.append("  and set FUSED_PRE_POST = True in kernels/cuda.py")
        best_unfused = next((x for x in ranked if x[2] == "unfused"), None)
        if best_unfused and best_unfused[1] != name:
            lines.append(f"  (best unfused: {best_unfused[1]} {best_unfused[0]} ms, row {best_unfused[4]['row']})")
    drift = [report["results"].get(x) for x in ("c64-base", "c64-base@end")]
    if all(d and at_heuristic(d, "unfused") for d in drift):
        a, b = (at_heuristic(d, "unfused") for d in drift)
        lines.append(f"\ncontrol drift (c64-base first vs last): {a} -> {b} ms ({(b / a - 1) * 100:+.1f}%)")
    failures = report.get("failures", [])
    if failures:
        lines.append(f"worker failures: {failures}")
    return "\n".join(lines) + "\n"


def run_workers(todo: list[str], args, roots: dict, report: dict, deadline: float, on_result, log) -> list[str]:
    """Run ``todo`` in worker processes (one at a time; a crashed or hung worker is replaced and the item in flight
    recorded as failed); ``on_result(result)`` for each result. Returns what was left when the deadline passed."""
    env = dict(os.environ, FACD_KERNEL_ARCHS=args.arch, PYTHONUNBUFFERED="1")
    while todo and time.monotonic() < deadline:
        cmd = [WORKER_PYTHON, str(Path(__file__).resolve()), "--worker", "--n", str(args.n),
               "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--roots", json.dumps(roots), "--only", *todo]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        current, started, results = None, time.monotonic(), 0
        while True:
            limit = args.variant_timeout * (3 if current in (None, "baselines") else 1)  # (startup: imports, CUDA)
            try:
                line = lines.get(timeout=max(0.1, min(started + limit, deadline) - time.monotonic()))
            except queue.Empty:
                line = "TIMEOUT"
            if line is None or line == "TIMEOUT":
                if line == "TIMEOUT":
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current is not None:
                    what = "timeout" if line == "TIMEOUT" else f"worker exited ({proc.returncode})"
                    report["failures"].append({"name": current, "what": what})
                    base = current.split(":")[1] if current.startswith("profile:") else current
                    on_result({"name": current, "c": VARIANTS.get(base.removesuffix("@end"), (0,))[0], "error": what})
                    todo = todo[todo.index(current) + 1 :] if current in todo else todo
                elif results == 0 and (line == "TIMEOUT" or proc.returncode):  # it never got going: give up
                    report["failures"].append({"name": "worker start", "what": f"exit {proc.returncode}"})
                    return todo
                break  # (a worker that exits after reporting an error is simply replaced)
            log.write(line)
            log.flush()
            if line.startswith("@@DEVICE "):
                report["device"] = json.loads(line[9:])
            elif line.startswith("@@START "):
                current, started = json.loads(line[8:]), time.monotonic()
            elif line.startswith("@@RESULT "):
                result = json.loads(line[9:])
                todo = [x for x in todo if x != result["name"]]
                current, results = None, results + 1
                on_result(result)
    return todo


def parent(args) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    args.arch = args.arch or gpu_arch()
    root = build.cache_root() / "tune-src"
    names = args.only or list(VARIANTS)
    report: dict = {"n": args.n, "arch": args.arch, "results": {}, "failures": [], "builds": {}}
    jsonl = (out / "tune.jsonl").open("a")
    log = (out / "worker.log").open("a")

    def save():
        (out / "tune.json").write_text(json.dumps(report, indent=1))
        try:
            text = summarize(report)
        except Exception:  # the JSON is what matters; never lose it to a reporting bug
            import traceback

            text = "summary failed:\n" + traceback.format_exc()
        (out / "tune_summary.txt").write_text(text)

    def on_result(result: dict) -> None:
        name = result["name"]
        jsonl.write(json.dumps(result) + "\n")
        jsonl.flush()
        if name.startswith("profile:"):
            target = report["results"].get(name.split(":")[1])
            if target is not None:
                target["profile"] = result.get("profile", {"error": result.get("error")})
                target["profile_splits"] = result.get("splits")
        else:
            report["results"][name] = result
        save()
        brief = {k: result.get(k) for k in ("name", "seconds", "best_raw_splits", "error") if k in result}
        if "correctness" in result:
            brief["correct"] = result["correctness"]["ok"]
        for mode in ("unfused", "fused"):
            best = best_fwd_bwd(result, mode)
            if best:
                brief[mode] = best
        print(json.dumps(brief), flush=True)

    start = time.perf_counter()
    builds = build_all(names, (args.arch,), root)
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    report["builds"] = builds
    print(f"built {len(builds)} variants for {args.arch} in {report['build_seconds']} s", flush=True)
    for name, b in builds.items():
        if "error" in b:
            report["results"][name] = {"name": name, "c": VARIANTS[name][0], "error": "build: " + b["error"][-500:]}
    roots = {name: b["source"] for name, b in builds.items() if "error" not in b}
    todo = ["baselines"] + [x for x in names if x in roots] + (["c64-base@end"] if "c64-base" in roots else [])
    left = run_workers(todo, args, roots, report, deadline, on_result, log)
    if left:
        report["failures"].append({"name": "not run", "what": left})
    # Profiles last (CUPTI may slow later launches): each C's control and its fastest eligible variants.
    profiles = []
    for c in (64, 256):
        control = f"c{c}-base"
        ranked = sorted(
            (ms, name, r["heuristic_splits"])
            for name, r in report["results"].items()
            if r.get("c") == c and not name.endswith("@end") and (name == control or eligible(r)[0])
            for ms in [at_heuristic(r, "unfused"), at_heuristic(r, "fused")]
            if ms
        )
        chosen = [x for x in ranked if x[1] == control][:1] + [x for x in ranked if x[1] != control]
        picked = list(dict.fromkeys((name, splits) for _, name, splits in chosen))[:3]  # control + 2 fastest
        profiles += [f"profile:{name}:{splits}" for name, splits in picked]
    if profiles and time.monotonic() < deadline:
        run_workers(profiles, args, roots, report, deadline, on_result, log)
    save()
    print((out / "tune_summary.txt").read_text(), flush=True)
    timed = [r for name, r in report["results"].items() if name != "baselines" and "fwd_bwd" in r]
    return 0 if timed else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tune-out"))
    parser.add_argument("--n", type=int, default=36864, help="N = M of the timings")
    parser.add_argument("--only", nargs="+", help="variant names (default: all)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--arch", help="target architecture (default: GPU 0's, from nvidia-smi)")
    parser.add_argument("--budget", type=float, default=230.0, help="seconds; no new worker starts after it")
    parser.add_argument("--variant-timeout", type=float, default=45.0, help="seconds per variant (3x for the first)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--compile-check", action="store_true", help="compile all variants for all archs (no GPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--roots", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, (c, tile, note) in VARIANTS.items():
            print(f"{name:22} C={c:<4} {tile.row():32} {note}")
        return 0
    if args.compile_check:
        root = build.cache_root() / "tune-src"
        for row in compile_check(args.only or list(VARIANTS), root):
            print(json.dumps(row), flush=True)
        return 0
    if args.worker:
        worker(args.only, args.n, args.warmup, args.iters, json.loads(args.roots))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
