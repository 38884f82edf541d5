"""CPU tests of kernels/: the float64 oracle (against explicit loops), the chunked path (gradcheck, oracle), the PyTorch
emulation of the CUDA kernel's tiled algorithm (against the oracle and the tolerance table of
shared/notes/fused_kernel.md), input validation, the nvcc compile (no spills, no warnings) and the kernel library's
cache and loading without a GPU."""

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kernels import KernelUnavailable, build, contrastive_loss, cuda
from kernels.contrastive import chunked_loss, logits_loss, naive_loss, normalize_rows
from kernels.emulate import emulate_kernel, kernel_tile, split_ranges
from conftest import load_script

F64 = torch.float64
# Notes' table (N = M = 4096, C = 64, tau = 0.07): loss abs error, gradient max error / max |gradient|.
TABLE = {torch.float16: (1.8e-5, 7.4e-4), torch.bfloat16: (1.3e-4, 5.5e-3)}
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _inputs(n, m, c, *, dtype=F64, seed=0, related=False):
    """Student (n, c) and teacher (m, c) rows; ``related``: teacher rows are noisy copies of student rows."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=gen, dtype=F64)
    t = (
        s[torch.arange(m) % n] + 0.5 * torch.randn(m, c, generator=gen, dtype=F64)
        if related
        else torch.randn(m, c, generator=gen, dtype=F64)
    )
    return s.to(dtype), t.to(dtype)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- the oracle --------------------------------------------------------------------------------------------------


def _loop_loss(s, t, tau, pos, rows_per_image, weight):
    """The loss with explicit Python loops and math (no torch arithmetic)."""
    s, t = s.tolist(), t.tolist()

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (max(math.sqrt(sum(x * x for x in a)), 1e-8) * max(math.sqrt(sum(y * y for y in b)), 1e-8))

    total = 0.0
    for i, row in enumerate(s):
        allowed = [
            j
            for j in range(len(t))
            if rows_per_image is None or j // rows_per_image != i // rows_per_image or j == pos[i]
        ]
        lse = math.log(sum(math.exp(cos(row, t[j]) / tau) for j in allowed))
        total += weight[i] * (lse - cos(row, t[pos[i]]) / tau)
    return total / len(s)


@pytest.mark.parametrize("rows_per_image", [None, 2])
def test_oracle_matches_explicit_loops(rows_per_image):
    s, t = _inputs(6, 7, 5)
    s[4] = 0.0  # a zero row: cosine 0 with everything
    pos = torch.tensor([3, 0, 6, 2, 5, 1])
    weight = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25], dtype=F64)
    expected = _loop_loss(s, t, 0.3, pos.tolist(), rows_per_image, weight.tolist())
    got = naive_loss(s, t, tau=0.3, pos=pos, rows_per_image=rows_per_image, weight=weight)
    assert got.item() == pytest.approx(expected, rel=1e-13, abs=1e-13)


# ---- the chunked path --------------------------------------------------------------------------------------------

CHUNKED_CASES = {  # n, m, c, rows_per_image, random pos, weighted, block_cols
    "square": (24, 24, 8, None, False, False, 5),
    "n!=m": (20, 33, 6, None, True, True, 7),
    "masked": (30, 30, 4, 6, False, True, 4),
    "masked n!=m": (25, 40, 5, 10, True, False, 16),
    "one tile": (12, 12, 3, 4, True, True, 64),
}


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=str)
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_chunked_matches_oracle_float64(case, tau):
    n, m, c, rows_per_image, random_pos, weighted, block_cols = CHUNKED_CASES[case]
    s, t = _inputs(n, m, c, seed=1)
    pos = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2)) if random_pos else None
    weight = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(3)) if weighted else None
    kw = dict(tau=tau, pos=pos, rows_per_image=rows_per_image, weight=weight)
    s_ref, s_new = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref = naive_loss(s_ref, t, **kw)
    got = chunked_loss(s_new, t, block_cols=block_cols, **kw)
    ref.backward()
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    assert _rel_err(s_new.grad, s_ref.grad) <= 1e-11


def test_chunked_gradcheck():
    s, t = _inputs(14, 18, 5, seed=4)  # (zero rows are not differentiable; the oracle test below covers them)
    pos = torch.randint(0, 18, (14,), generator=torch.Generator().manual_seed(5))
    weight = torch.rand(14, dtype=F64, generator=torch.Generator().manual_seed(6))

    def loss(x):
        return chunked_loss(x, t, tau=0.2, pos=pos, rows_per_image=4, weight=weight, block_cols=3)

    assert torch.autograd.gradcheck(loss, (s.requires_grad_(),))


def test_chunked_float32_large_matches_oracle():
    s, t = _inputs(2048, 2048, 64, seed=7, related=True)
    s64 = s.clone().requires_grad_()
    ref = naive_loss(s64, t, tau=0.07, rows_per_image=512)
    ref.backward()
    s32 = s.float().requires_grad_()
    got = chunked_loss(s32, t.float(), tau=0.07, rows_per_image=512)
    got.backward()
    assert abs(got.item() - ref.item()) <= 2e-6, (got.item(), ref.item())
    assert _rel_err(s32.grad.double(), s64.grad) <= 2e-5


def test_duplicate_and_zero_rows_chunked_matches_oracle():
    s, t = _inputs(40, 40, 8, seed=8)
    s[3], t[5], s[7], t[9], t[11] = 0.0, 0.0, s[8], t[10], t[1]
    s_ref, s_new = s.clone().requires_grad_(), s.clone().requires_grad_()
    naive_loss(s_ref, t, tau=0.1, rows_per_image=10).backward()
    chunked_loss(s_new, t, tau=0.1, rows_per_image=10, block_cols=6).backward()
    assert torch.isfinite(s_new.grad).all()
    assert _rel_err(s_new.grad, s_ref.grad) <= 1e-11


def test_auto_on_cpu_is_the_chunked_path():
    s, t = _inputs(50, 50, 16, dtype=torch.float32, seed=9)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = contrastive_loss(s1, t, tau=0.1, rows_per_image=10)
    b = chunked_loss(s2, t, tau=0.1, rows_per_image=10)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(s1.grad, s2.grad)


def test_double_backward_raises():
    s, t = _inputs(10, 10, 4, seed=10)
    s.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(chunked_loss(s, t, tau=0.1), s, create_graph=True)


# ---- the emulation of the CUDA kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulation_meets_the_tolerance_table(dtype):
    """At the table's setting the kernel's algorithm must be within 3x of the notes' errors (vs the float64 oracle)."""
    s, t = _inputs(4096, 4096, 64, seed=11)
    q = normalize_rows(s).requires_grad_()  # unit rows: the oracle's dL/ds is the tangential part of dL/dq
    ref = naive_loss(q, t, tau=0.07)
    ref.backward()
    k = normalize_rows(t)
    loss_rows, _, grad = emulate_kernel(q.detach().float(), k.float(), torch.arange(4096), tau=0.07, dtype=dtype)
    grad = grad.double()
    tangential = grad - q.detach() * (q.detach() * grad).sum(1, keepdim=True)
    loss_err, grad_err = abs(loss_rows.double().mean().item() - ref.item()), _rel_err(tangential, q.grad)
    assert loss_err <= 3 * TABLE[dtype][0] and grad_err <= 3 * TABLE[dtype][1], (loss_err, grad_err)


EMULATION_CASES = {  # n, m, c, rows_per_image, splits, duplicate/zero rows
    "tile multiples": (256, 128, 64, None, 1, False),
    "ragged, padded C": (300, 257, 40, 50, 3, True),
    "n!=m small C": (130, 70, 16, None, 2, False),
    "C=256 masked": (96, 96, 256, 32, 2, True),
    "C=128 ragged images": (65, 65, 128, 13, 1, False),
    "C=32 n<m": (50, 1000, 32, 100, 4, False),
}


@pytest.mark.parametrize("case", EMULATION_CASES, ids=str)
@pytest.mark.parametrize("tau", [0.01, 0.07, 0.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulation_matches_oracle_on_rounded_operands(case, tau, dtype):
    """Tiles, splits, masks, padding: against the float64 oracle fed the same rounded operands, the only error left is
    fp32 accumulation (loss) and the rounding of P (gradient, well under one unit roundoff)."""
    n, m, c, rows_per_image, splits, degenerate = EMULATION_CASES[case]
    s, t = _inputs(n, m, c, seed=12, related=True)
    if degenerate:
        s[3], t[5], s[7], t[9], t[11] = 0.0, 0.0, s[8], t[10], t[1]
    gen = torch.Generator().manual_seed(13)
    pos = torch.randint(0, m, (n,), generator=gen)
    weight = torch.rand(n, dtype=F64, generator=gen)
    q, k = normalize_rows(s).float(), normalize_rows(t).float()
    q_op = q.to(dtype).double().requires_grad_()
    ref = logits_loss(q_op @ k.to(dtype).double().T / tau, pos, rows_per_image, weight)
    ref.backward()
    loss_rows, lse, grad = emulate_kernel(
        q, k, pos, tau=tau, rows_per_image=rows_per_image, weight=weight.float(), dtype=dtype, splits=splits
    )
    assert abs(loss_rows.double().mean().item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    assert _rel_err(grad.double(), q_op.grad) <= UNIT_ROUNDOFF[dtype] / 2


def test_tile_table_fits_every_target():
    """The kernel's configurations, parsed from the .cu: MMA-aligned, and shared memory within sm_86/89's 99 KB."""
    table = build.tile_table()
    assert sorted(table) == [16, 32, 64, 128, 256]
    for c, tile in table.items():
        assert tile.block_cols % 16 == 0 and tile.block_rows % 16 == 0
        assert tile.stages >= 2 and tile.min_blocks >= 1 and tile.q_in_registers in (0, 1) and tile.lazy_rescale >= 0
        assert tile.lazy_rescale <= 15  # P <= 2^LAZY must stay far from fp16's 65504
        assert tile.smem_bytes() == (tile.block_rows + tile.stages * tile.block_cols) * (c + 8) * 2 <= 99 * 1024
    assert kernel_tile(40).channels == 64 and kernel_tile(256).channels == 256
    with pytest.raises(KernelUnavailable, match="at most 256"):
        kernel_tile(257)


@pytest.mark.parametrize("m, block_cols, splits", [(1, 64, 4), (257, 64, 3), (1000, 32, 4), (640, 64, 4), (65, 64, 8)])
def test_split_ranges_cover_the_columns_in_whole_tiles(m, block_cols, splits):
    ranges = split_ranges(m, block_cols, splits)
    assert ranges[0][0] == 0 and ranges[-1][1] == m and 1 <= len(ranges) <= splits
    for (_, end), (begin, _) in zip(ranges, ranges[1:]):
        assert end == begin and begin % block_cols == 0
    assert all(end > begin for begin, end in ranges)


def test_choose_splits_fills_the_last_wave():
    tile = build.Tile(64, 2, 4, 64)  # 128 rows x 64 columns
    # 36864 rows: 288 row blocks; 132 SMs x 2 blocks: fills .55, .73, .82, .87 for 1..4 splits -> 4
    assert cuda.choose_splits(36864, 36864, tile, sm_count=132, resident_blocks=2) == 4
    assert cuda.choose_splits(36864, 36864, tile, sm_count=144, resident_blocks=2) == 1  # 288 = one full wave
    assert cuda.choose_splits(4096, 128, tile, sm_count=132, resident_blocks=2) == 1  # too few column tiles


# ---- validation and error paths ----------------------------------------------------------------------------------

ERRORS = {
    "tau zero": (dict(tau=0.0), "tau"),
    "tau negative": (dict(tau=-1.0), "tau"),
    "tau nan": (dict(tau=float("nan")), "tau"),
    "impl": (dict(impl="fast"), "impl"),
    "n!=m without pos": (dict(t=torch.randn(9, 4)), "pos is required"),
    "channels": (dict(t=torch.randn(8, 5)), r"\(N, C\) and \(M, C\)"),
    "1-d": (dict(s=torch.randn(8)), r"\(N, C\)"),
    "pos range": (dict(pos=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])), r"\[0, 8\)"),
    "pos negative": (dict(pos=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])), r"\[0, 8\)"),
    "pos shape": (dict(pos=torch.arange(7)), "shape"),
    "pos float": (dict(pos=torch.zeros(8)), "integer"),
    "weight shape": (dict(weight=torch.ones(7)), "weight"),
    "weight grad": (dict(weight=torch.ones(8, requires_grad=True)), "weight must not require grad"),
    "teacher grad": (dict(t=torch.randn(8, 4, requires_grad=True)), "teacher is frozen"),
    "one image": (dict(rows_per_image=8), "no negative"),
    "rows_per_image": (dict(rows_per_image=0), "rows_per_image"),
    "single column": (dict(t=torch.randn(1, 4), pos=torch.zeros(8, dtype=torch.long)), "no negative"),
    "integer rows": (dict(s=torch.ones(8, 4, dtype=torch.long)), "floating"),
}


@pytest.mark.parametrize("case", ERRORS, ids=str)
@pytest.mark.parametrize("impl", ["naive", "chunked", "auto"])
def test_invalid_arguments_raise_value_error(case, impl):
    changes, message = ERRORS[case]
    kw = dict(s=torch.randn(8, 4, requires_grad=True), t=torch.randn(8, 4), tau=0.1, impl=impl) | changes
    with pytest.raises(ValueError, match=message):
        contrastive_loss(kw.pop("s"), kw.pop("t"), **kw)


def test_row_without_negatives_is_named():
    # 4 rows per image. With M = 4 the columns all belong to image 0, so rows 0-3 have only their positive left;
    # with M = 9 every row keeps negatives in other images (rows 0-3: columns 4-8).
    s, t = torch.randn(10, 3), torch.randn(4, 3)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="row 0 has no negative"):  # rows 0-3: image 0 holds all 4 columns
        contrastive_loss(s, t, tau=0.1, pos=pos, rows_per_image=4)
    assert torch.isfinite(contrastive_loss(s, torch.randn(9, 3), tau=0.1, pos=pos, rows_per_image=4))


@pytest.mark.parametrize("n, rows_per_image", [(8, 8), (8, 9), (8, 7), (9, 4), (1, 1), (2, 1), (5, 5), (6, 5)])
def test_default_pos_negatives_check_on_the_host_matches_the_device_check(n, rows_per_image):
    """With pos=None the negatives check is decided without reading the device; it must agree with the explicit
    pos=arange path (which computes it on the device)."""
    s, t = torch.randn(n, 3), torch.randn(n, 3)

    def outcome(pos):
        try:
            contrastive_loss(s, t, tau=0.1, pos=pos, rows_per_image=rows_per_image)
        except ValueError as exc:
            return str(exc)
        return None

    assert outcome(None) == outcome(torch.arange(n))


def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="same device"):
        contrastive_loss(torch.randn(4, 3), torch.empty(4, 3, device="meta"), tau=0.1)


def test_cuda_impl_rejects_cpu_tensors():
    with pytest.raises(KernelUnavailable, match="needs CUDA tensors"):
        contrastive_loss(torch.randn(8, 4), torch.randn(8, 4), tau=0.1, impl="cuda")
    q = torch.randn(8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda.forward(q, q, torch.arange(8), tau=0.1)


# ---- nvcc build --------------------------------------------------------------------------------------------------


def _nvcc_or_skip():
    try:
        return build.find_nvcc()
    except KernelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def compile_reports():
    _nvcc_or_skip()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(build.DEFAULT_ARCHS, pool.map(build.compile_report, build.DEFAULT_ARCHS)))


@pytest.mark.parametrize("arch", build.DEFAULT_ARCHS)
def test_compiles_without_spills_or_warnings(compile_reports, arch):
    log, spills, warnings = compile_reports[arch]
    assert f"for '{arch}'" in log  # ptxas reported on this architecture's kernels
    # partial kernels for both dtypes, + 2 combine kernels, + 6 prepare (3 inputs x 2 operands) + 3 backward
    assert log.count("Compiling entry function") == 2 * (len(build.tile_table()) + 1) + 6 + 3
    assert spills == 0, log
    assert warnings == [], "\n".join(warnings)


def test_tile_table_parsing_and_replacement():
    text = build.SOURCE.read_text()
    table = build.parse_tile_table(text)
    assert table == build.tile_table()
    variant = build.Tile(64, 1, 8, 128, 2, 1, 3, 8)
    other = build.replace_tile_table(text, [variant, table[256]])
    assert build.parse_tile_table(other) == {64: variant, 256: table[256]}
    assert other.replace(other[other.index("#define FACD_TILES") : other.index("namespace {")], "") == text.replace(
        text[text.index("#define FACD_TILES") : text.index("namespace {")], ""
    )  # nothing else changes
    assert variant.row() == "X(64, 1, 8, 128, 2, 1, 3, 8)" and variant.block_rows == 128
    # the first benchmark's 4-column rows still parse (trailing columns take the defaults)
    assert build.parse_tile_table("#define FACD_TILES(X) \\\n    X(64, 2, 4, 64)\n")[64] == build.Tile(64, 2, 4, 64)


def test_source_and_arch_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("FACD_KERNEL_CACHE", str(tmp_path))
    default = build.library_path()
    assert build.default_archs() == build.DEFAULT_ARCHS and build.source_path() == build.SOURCE
    monkeypatch.setenv("FACD_KERNEL_ARCHS", "sm_90")
    assert build.default_archs() == ("sm_90",) and build.library_path() == build.library_path(("sm_90",)) != default
    variant = tmp_path / "variant.cu"
    variant.write_text(build.replace_tile_table(build.SOURCE.read_text(), [build.Tile(64, 2, 4, 32, 3, 0, 2, 8)]))
    monkeypatch.setenv("FACD_KERNEL_SOURCE", str(variant))
    assert build.source_path() == variant and sorted(build.tile_table()) == [64]
    assert kernel_tile(16).block_cols == 32  # the emulation and split heuristic follow the selected source
    assert build.library_path(("sm_90",)) != build.library_path(("sm_90",), build.SOURCE)


def test_tune_variants_are_well_formed(tmp_path, capsys):
    tune = load_script("benchmarks/kernel_tune.py")

    channels = {c for c, _, _ in tune.VARIANTS.values()}
    assert channels == {64, 256} and all(f"c{c}-base" in tune.VARIANTS for c in channels)  # each C's control
    for name, (c, tile, note) in tune.VARIANTS.items():
        assert note and isinstance(tile, build.Tile), name  # every variant, the control included, is a tile row
        assert note.startswith("control") == name.endswith("-base"), name
        assert tile.channels == c and tile.block_cols % 16 == 0 and tile.stages >= 2
        assert tile.smem_bytes() <= 99 * 1024, name  # adoptable on every target
    for c in channels:  # the control's source is the current kernel with the tile before tuning
        control = tune.variant_source(f"c{c}-base", tmp_path)
        assert build.tile_table(control) == {c: tune.VARIANTS[f"c{c}-base"][1]}
    assert tune.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in listed] == list(tune.VARIANTS) and all(" X(" in x for x in listed)
    rows = {tile for _, tile, _ in tune.VARIANTS.values()}
    assert build.tile_table()[64] in rows and build.tile_table()[256] in rows  # the default is always re-measured


def test_tune_summary_of_synthetic_results():
    """The experiment's report writer (runs on the GPU machine at the end; must not fail on partial results)."""
    tune = load_script("benchmarks/kernel_tune.py")

    def variant(name, ms, ok=True, local=0):
        c, tile, note = tune.VARIANTS[name]
        return {
            "name": name, "c": c, "note": note, "row": tile.row(),
            "info": {"float16": {"registers": 200, "local_bytes": local, "blocks_per_sm": 2, "smem_bytes": 36864}},
            "correctness": {"ok": ok, "checks": {"oracle table float16 unfused": {"ok": ok}}},
            "heuristic_splits": 4, "best_raw_splits": 3, "raw": {"3": {"p50_ms": ms - 0.1}, "4": {"p50_ms": ms}},
            "fwd_bwd": {"unfused/4": {"p50_ms": ms + 0.05}, "unfused/3": {"p50_ms": ms},
                        "fused/4": {"p50_ms": ms - 0.02}, "fused/3": {"p50_ms": ms - 0.07}},
            "profile": {"fused": {"gpu_us_per_step": {"partial_kernel": 1000.0}, "kernels_per_step": {"other": 3}}},
        }  # fmt: skip

    results = {
        "baselines": {"name": "baselines", "rows": {"64": {"naive": {"p50_ms": 9.6}, "cublas": {"p50_ms": 0.86}}}},
        "c64-base": variant("c64-base", 1.42),
        "c64-lazy-3st": variant("c64-lazy-3st", 1.30),
        "c64-lazy": variant("c64-lazy", 1.10, ok=False),
        "c64-bn32": variant("c64-bn32", 1.20, local=16),
        "c64-8w16r": variant("c64-8w16r", 1.25),
        "c64-8w32r": {"name": "c64-8w32r", "c": 64, "error": "timeout"},
        "c64-base@end": variant("c64-base", 1.43),
    }
    text = tune.summarize({"n": 36864, "device": {"name": "GPU"}, "results": results, "failures": []})
    assert "winner C=64: c64-8w16r (fused, heuristic splits 4): 1.23 ms vs control 1.47 ms (1.20x)" in text
    assert "note: 3 splits would give 1.18 ms (the heuristic picks 4)" in text
    assert "X(64, 1, 8, 64, 2, 1, 2, 8)" in text and "FUSED_PRE_POST = True" in text
    assert "ERROR timeout" in text and "local memory 16 B" in text and "failed: oracle table" in text
    assert "control drift (c64-base first vs last): 1.47 -> 1.48 ms" in text
    assert "no eligible variant" in text  # (C = 256: nothing ran)


FAKE_WORKER = """
import json, sys, time
args = sys.argv[sys.argv.index("--only") + 1 :]
print("@@DEVICE " + json.dumps({"name": "fake"}), flush=True)
for name in args:
    print("@@START " + json.dumps(name), flush=True)
    if name == "c64-lazy":
        sys.exit(3)  # a crash without a result
    if name == "c64-bn32":
        time.sleep(60)  # a hang
    if name == "c64-8w32r":  # an error reported before exiting (as the real worker does after a CUDA error)
        print("@@RESULT " + json.dumps({"name": name, "error": "RuntimeError('CUDA error')"}), flush=True)
        sys.exit(3)
    if name == "baselines":
        print("@@RESULT " + json.dumps({"name": name, "rows": {"64": {"cublas": {"p50_ms": 1.0}}}}), flush=True)
        continue
    if name.startswith("profile:"):
        profile = {"unfused": {"gpu_us_per_step": {"partial_kernel": 900.0}, "kernels_per_step": {"other": 20}}}
        print("@@RESULT " + json.dumps({"name": name, "splits": 1, "profile": profile}), flush=True)
        continue
    result = {"name": name, "c": 64, "note": "", "row": "X()", "info": {}, "heuristic_splits": 1, "best_raw_splits": 1,
              "correctness": {"ok": True, "checks": {}}, "raw": {"1": {"p50_ms": 1.0}},
              "fwd_bwd": {"unfused/1": {"p50_ms": 2.0 if name.startswith("c64-base") else 1.5}}}
    print("@@RESULT " + json.dumps(result), flush=True)
"""


def test_tune_scheduler_survives_crashes_and_hangs(tmp_path, monkeypatch):
    tune = load_script("benchmarks/kernel_tune.py")

    fake = tmp_path / "fake_worker.py"
    monkeypatch.setattr(tune, "WORKER_PYTHON", str(fake))
    monkeypatch.setattr(tune, "build_all", lambda names, archs, root: {n: {"source": f"{n}.cu"} for n in names})
    fake.write_text("#!" + sys.executable + "\n" + FAKE_WORKER)  # (run as a script: its arguments are ignored)
    fake.chmod(0o755)
    names = ["c64-base", "c64-lazy", "c64-8w32r", "c64-bn32", "c64-8w16r", "c64-4w16r"]
    args = ["--out", str(tmp_path / "out"), "--arch", "sm_90", "--variant-timeout", "1", "--budget", "60"]
    assert tune.main(args + ["--only", *names]) == 0
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert set(report["results"]) == {"baselines", *names, "c64-base@end"}
    assert report["results"]["c64-lazy"]["error"] == "worker exited (3)"
    assert report["results"]["c64-bn32"]["error"] == "timeout"
    assert report["results"]["c64-8w32r"]["error"] == "RuntimeError('CUDA error')"
    assert "fwd_bwd" in report["results"]["c64-8w16r"] and "fwd_bwd" in report["results"]["c64-base@end"]
    assert [f["name"] for f in report["failures"]] == ["c64-lazy", "c64-bn32"]
    summary = (tmp_path / "out" / "tune_summary.txt").read_text()
    assert "winner C=64: c64-8w16r (unfused, heuristic splits 1): 1.5 ms vs control 2.0 ms" in summary
    assert "kernel / cublas: 1.50" in summary
    assert "profile winner unfused (splits 1): GPU us/step {'partial_kernel': 900.0}" in summary
    assert "profile control unfused" in summary
    assert "control drift (c64-base first vs last): 2.0 -> 2.0 ms" in summary
    profiled = {name for name, r in report["results"].items() if "profile" in r}
    assert profiled == {"c64-base", "c64-8w16r", "c64-4w16r"}  # the control + the 2 fastest others


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    _nvcc_or_skip()
    cache = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACD_KERNEL_CACHE", str(cache))
        return cache, build.build_kernel(archs=("sm_80",))


def test_build_is_cached_by_source_and_arch(built_library, monkeypatch):
    cache, path = built_library
    monkeypatch.setenv("FACD_KERNEL_CACHE", str(cache))
    assert path.parent.parent == cache and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert build.build_kernel(archs=("sm_80",)) == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert build.library_path(("sm_86",)) != path and build.library_path(("sm_80",)) == path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_library_loads_and_fails_cleanly_without_gpu(built_library):
    lib = cuda.load_library(built_library[1])
    with pytest.raises(KernelUnavailable, match="occupancy query failed"):
        cuda.blocks_per_sm(lib, torch.float16, 64, 0)
    assert b"tile configuration" in lib.facd_error_string(-1)
    with pytest.raises(KernelUnavailable, match="kernel info query failed"):
        cuda.kernel_info(lib, torch.float16, 64, 0)
    assert lib.facd_prepare(2, 0, 0, None, 4, 8, 4, 1e-8, None, None, None) == -2  # c_pad < c_in: rejected first
