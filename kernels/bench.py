"""Benchmark the contrastive loss (forward + backward) on a GPU: ``python -m kernels.bench --out DIR``.

Providers, on the same inputs (N = M rows, C channels, tau = 0.07, no mask):

* ``naive``: ``F.cross_entropy(F.normalize(s) @ F.normalize(t).T / tau, arange(N))`` (materialises N x M);
* ``chunked``: ``contrastive_loss(impl="chunked")``, the column-tiled PyTorch path (float32 math);
* ``sdpa``: flash attention with V = K (``aten._scaled_dot_product_flash_attention``) for softmax-weighted k and LSE,
  loss and gradient as in the kernel (``RowGradLoss``, same normalisation and backward);
* ``cublas``: ``Q @ K.T`` alone with fp16/bf16 output: the cost of merely producing the logits;
* ``kernel``: ``contrastive_loss(impl="cuda")``.

Protocol: providers interleaved; ``--warmup`` untimed rounds, then ``--iters`` timed rounds with CUDA events; p10 /
p50 / p90 in ms. Extra memory: ``max_memory_allocated`` during one call minus ``memory_allocated`` before it (after
``reset_peak_memory_stats``). ``naive`` is skipped where it would not fit. Writes ``kernel_bench.json`` (device, SM
count, versions, one row per provider x size) and ``kernel_memory.png`` (log-log extra memory vs N; skipped with a
note if matplotlib is missing), and prints the targets of shared/notes/fused_kernel.md at N = 36864, C = 64, fp16.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import contrastive_loss, cuda
from kernels.build import library_path
from kernels.rowgrad import EPS, RowGradLoss
from kernels.emulate import kernel_tile, rows_loss_and_grad

TAU = 0.07
MIB = 2**20


def sdpa_loss(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """The loss with flash attention (V = K) as the engine of ``RowGradLoss``."""
    k = (t.float() / torch.linalg.vector_norm(t.float(), dim=1, keepdim=True).clamp_min(EPS)).to(t.dtype)
    pos = torch.arange(s.shape[0], device=s.device)

    def engine(s_, inv_norm):
        q = (s_ * inv_norm[:, None]).to(s.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q[None, None], k[None, None], k[None, None], scale=1.0 / tau
        )[:2]
        return rows_loss_and_grad(q.float(), k.float(), pos, lse[0, 0], out[0, 0].float(), tau=tau, weight=None)

    return RowGradLoss.apply(s, engine)


def loss_step(s: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One forward + backward of the loss `fn` of the leaf `s`, as a timed step (returns the loss)."""

    def step():
        s.grad = None
        loss = fn()
        loss.backward()
        return loss

    return step


def extra_memory(step: Callable) -> tuple[float, object]:
    """(MiB allocated at the peak of one call of `step` beyond what was allocated before it, its return value)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    value = step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / MIB, 2), value


def providers(s: torch.Tensor, t: torch.Tensor, with_reference: bool) -> dict[str, Callable[[], float | None]]:
    """Name -> one forward + backward (or the bare GEMM); loss providers return the loss value."""
    pos = torch.arange(s.shape[0], device=s.device)
    q, k = F.normalize(s.detach(), dim=1), F.normalize(t, dim=1)
    out = {}
    if with_reference:
        out["naive"] = loss_step(s, lambda: F.cross_entropy(F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / TAU, pos))
        out["chunked"] = loss_step(s, lambda: contrastive_loss(s, t, tau=TAU, impl="chunked"))
    out["sdpa"] = loss_step(s, lambda: sdpa_loss(s, t, TAU))
    out["cublas"] = lambda: torch.mm(q, k.T)
    out["kernel"] = loss_step(s, lambda: contrastive_loss(s, t, tau=TAU, impl="cuda"))
    return out


def naive_fits(n: int, dtype: torch.dtype) -> bool:
    """About six N x N matrices of the input dtype live at once in the naive forward + backward."""
    free, _ = torch.cuda.mem_get_info()
    return 6 * n * n * torch.tensor([], dtype=dtype).element_size() < 0.8 * free


def measure(steps: dict[str, Callable], warmup: int, iters: int) -> dict[str, dict]:
    """Extra memory and loss of one call each, then interleaved CUDA-event timings (ms percentiles).

    A provider that raises on its first call is reported with the error and left out, so the others still run.
    """
    results = {}
    for name, step in list(steps.items()):
        try:
            step()
        except Exception as exc:
            results[name] = {"error": repr(exc)[:500]}
            del steps[name]
            torch.cuda.empty_cache()
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    for name, step in steps.items():
        extra, value = extra_memory(step)
        loss = value.item() if value is not None and value.dim() == 0 else None
        results[name] = {"extra_mib": extra, "loss": loss}
        del value
    for name, percentiles in interleaved_times(steps, iters).items():
        results[name].update(percentiles)
    return results


def interleaved_times(steps: dict[str, Callable], iters: int) -> dict[str, dict[str, float]]:
    """CUDA-event p10/p50/p90 (ms) of each step over `iters` rounds, the steps interleaved in every round."""
    events: dict[str, list] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    out = {}
    for name, pairs in events.items():
        times = torch.tensor([a.elapsed_time(b) for a, b in pairs])
        p10, p50, p90 = torch.quantile(times, torch.tensor([0.1, 0.5, 0.9])).tolist()
        out[name] = {"p10_ms": round(p10, 4), "p50_ms": round(p50, 4), "p90_ms": round(p90, 4)}
    return out


def run(sizes, channels, dtypes, warmup, iters) -> list[dict]:
    rows = []
    props = torch.cuda.get_device_properties(0)
    for dtype in dtypes:
        for c in channels:
            for n in sizes:
                gen = torch.Generator(device="cuda").manual_seed(n + c)
                s = torch.randn(n, c, device="cuda", dtype=dtype, generator=gen).requires_grad_()
                t = torch.randn(n, c, device="cuda", dtype=dtype, generator=gen)
                reference = dtype == torch.float16
                steps = providers(s, t, with_reference=reference)
                if reference and not naive_fits(n, dtype):
                    del steps["naive"]
                    print(f"N={n} C={c}: naive skipped (would not fit)", flush=True)
                results = measure(steps, warmup, iters)
                for name, r in results.items():
                    row = {"provider": name, "n": n, "c": c, "dtype": str(dtype).removeprefix("torch."), **r}
                    if name == "kernel" and "error" not in r:
                        tile = kernel_tile(c)
                        info = cuda.kernel_info(cuda.library(), dtype, tile.channels, 0)
                        row["splits"] = cuda.choose_splits(n, n, tile, props.multi_processor_count,
                                                           info["blocks_per_sm"])  # fmt: skip
                        row["tile"], row["kernel_info"] = tile.row(), info
                        row["fused_pre_post"] = cuda.FUSED_PRE_POST
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del s, t, steps
                torch.cuda.empty_cache()
    return rows


def targets(rows: list[dict]) -> dict:
    """The notes' targets at N = M = 36864, C = 64, fp16 (fwd + bwd p50)."""
    at = {r["provider"]: r for r in rows if (r["n"], r["c"], r["dtype"]) == (36864, 64, "float16") and "p50_ms" in r}
    if "kernel" not in at:
        return {}
    kernel, extra = at["kernel"]["p50_ms"], at["kernel"]["extra_mib"]
    out = {"kernel_ms": kernel, "kernel_extra_mib": extra, "extra_below_64_mib": extra < 64}
    if "naive" in at:
        out.update(speedup_vs_naive=round(at["naive"]["p50_ms"] / kernel, 2))
        out.update(speedup_at_least_8x=out["speedup_vs_naive"] >= 8)
    if "sdpa" in at:
        out.update(kernel_over_sdpa=round(kernel / at["sdpa"]["p50_ms"], 3))
        out.update(at_least_as_fast_as_sdpa=out["kernel_over_sdpa"] <= 1.0)
    if "cublas" in at:
        out.update(kernel_over_cublas=round(kernel / at["cublas"]["p50_ms"], 3))
        out.update(within_1_5x_of_cublas=out["kernel_over_cublas"] <= 1.5)
    return out


def plot(rows: list[dict], path: Path) -> str:
    """Log-log extra memory vs N per provider (fp16 rows, else the first dtype), one panel per C; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not importable"
    dtype = "float16" if any(r["dtype"] == "float16" for r in rows) else rows[0]["dtype"]
    chosen = [r for r in rows if r["dtype"] == dtype and "extra_mib" in r]
    channels = sorted({r["c"] for r in chosen})
    fig, axes = plt.subplots(1, len(channels), figsize=(6 * len(channels), 4.5), squeeze=False)
    for ax, c in zip(axes[0], channels):
        for name in dict.fromkeys(r["provider"] for r in chosen):
            pts = sorted((r["n"], max(r["extra_mib"], 1e-3)) for r in chosen if r["provider"] == name and r["c"] == c)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(
            xscale="log", yscale="log", xlabel="N = M", ylabel="extra memory (MiB)", title=f"C = {c}, {dtype}, fwd+bwd"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for kernel_bench.json, kernel_memory.png")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 9216, 16384, 36864])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], help="naive/chunked run for fp16 only")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    rows = run(args.sizes, args.channels, [getattr(torch, d) for d in args.dtypes], args.warmup, args.iters)
    report = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernel_library": str(library_path()),
        "protocol": {"tau": TAU, "warmup": args.warmup, "iters": args.iters, "timing": "CUDA events, interleaved"},
        "targets": targets(rows),
        "rows": rows,
    }
    try:
        report["plot"] = plot(rows, args.out / "kernel_memory.png")
    except Exception as exc:  # the measurements matter more than the figure
        report["plot"] = f"plot failed: {exc!r}"
    (args.out / "kernel_bench.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("device", "sm_count", "targets", "plot")}, indent=1))


if __name__ == "__main__":
    main()
