"""models/anchor.py and models/ecb.py: folding is exact, the anchor is nearest-neighbour upsampling, the output is
clamped, checkpoints of both forms load, taps, ONNX ops, and parameter / FLOP counts by hand.

Expectations are written here from the papers' definitions (the Sobel / Laplacian kernels, nearest-neighbour
upsampling by index repetition, the pixel-shuffle channel order), not from the modules' own helpers.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import (
    ECB,
    PRESETS,
    AnchorNet,
    CheckpointError,
    build_model,
    count_flops,
    count_params,
    create_model,
    folded,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

SCALES = (2, 3, 4)


def anchor(scale: int, channels: int = 6, blocks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64,
           residual: float = 0.3) -> AnchorNet:
    """A branched net with every parameter random and non-trivial (biases and ECB edge scales included);
    the last layer scaled by `residual` so that most outputs stay inside (0, 1), where the clamp hides nothing."""
    torch.manual_seed(seed)
    m = build_model({"arch": "anchor", "scale": scale, "channels": channels, "blocks": blocks}).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 4:  # conv weights: fan-in scaled
                p.copy_(torch.randn_like(p) * 0.4 / math.sqrt(p[0].numel()))
            elif name.endswith("scale"):  # ECB edge branches: (cout, 1, 1, 1)
                p.copy_(torch.randn_like(p) * 0.3)
            else:  # biases
                p.copy_(torch.randn_like(p) * 0.2)
            if name.startswith("last."):
                p.mul_(residual)
    return m.eval()


def explicit(m: nn.Module) -> nn.Module:
    """Every ECB of `m` sums its five branches as written (the definition) instead of deriving one kernel."""
    for mod in m.modules():
        if isinstance(mod, ECB):
            mod.explicit = True
    return m


def zero_(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def nearest(x: Tensor, s: int) -> Tensor:
    """Nearest-neighbour upsampling: every LR pixel repeated s x s times."""
    return x.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)


# ---------------------------------------------------------------- folding


@pytest.mark.parametrize("scale", SCALES)
def test_folded_equals_branched_float64(scale: int) -> None:
    m = explicit(anchor(scale))
    f = folded(m)
    assert f is not m and f.is_folded and not m.is_folded
    for shape in [(2, 3, 5, 7), (1, 3, 1, 1), (1, 3, 2, 9)]:  # 1x1: every pixel is a border pixel
        x = torch.rand(*shape, dtype=torch.float64)
        with torch.no_grad():
            y, feats = m.forward_features(x, range(m.num_taps))
            yf, feats_f = f.forward_features(x, range(f.num_taps))
            # the last conv before the anchor and the clamp, so that clamping cannot hide a difference
            r, rf = m.last(feats[-1]), f.last(feats[-1])
        assert yf.dtype == torch.float64
        for a, b in zip(feats, feats_f, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(rf, r, rtol=0, atol=1e-5)
        torch.testing.assert_close(yf, y, rtol=0, atol=1e-5)
        inside = ((y > 0) & (y < 1)).double().mean().item()
        assert inside > 0.5, f"only {inside:.0%} of the outputs are unclamped: the comparison would say little"
        assert r.abs().max() > 0.01  # a real residual, not a vanishing one


def test_fold_float32_error_is_float32_rounding() -> None:
    m64 = explicit(anchor(4, channels=16, blocks=4))
    m32 = explicit(anchor(4, channels=16, blocks=4, dtype=torch.float32))
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = m64(x)
        err_branched = (m32(x.float()).double() - ref).abs().max().item()
        err_folded = (folded(m32)(x.float()).double() - ref).abs().max().item()
    # folding (done in float64) adds no error beyond what float32 itself costs the branched net
    assert err_folded <= max(4 * err_branched, 1e-6), (err_folded, err_branched)


def test_ecb_training_forward_has_the_branches_values_and_gradients() -> None:
    """ECB.forward derives one kernel from the branches at every call: the same outputs and the same gradient for
    every branch parameter as summing the five branches (float64)."""
    torch.manual_seed(1)
    ecb = ECB(5, 7).double()
    with torch.no_grad():
        for p in ecb.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.rand(2, 5, 9, 6, dtype=torch.float64)
    target = torch.randn(2, 7, 9, 6, dtype=torch.float64)
    grads = {}
    for mode in (False, True):
        ecb.explicit = mode
        ecb.zero_grad()
        ((ecb(x) - target) ** 2).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in ecb.named_parameters()}
    ecb.explicit = False
    with torch.no_grad():
        torch.testing.assert_close(ecb(x), ecb.branches(x), rtol=0, atol=1e-10)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 10  # 3x3 w + b, 1x1, 3x3, 3 x (1x1, scale)
    for name in grads[True]:
        torch.testing.assert_close(grads[False][name], grads[True][name], rtol=1e-9, atol=1e-10)


def test_ecb_edge_branches_are_sobel_and_laplacian() -> None:
    """With an identity 1x1 conv and unit scale, each edge branch is its textbook 3x3 filter."""
    kernels = {"sobel_x": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
               "sobel_y": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
               "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]]}
    ecb = ECB(2, 2).double()
    x = torch.rand(1, 2, 6, 5, dtype=torch.float64)
    for name, k in kernels.items():
        branch = getattr(ecb, name)
        with torch.no_grad():
            branch.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            branch.scale.fill_(1.0)
            want = F.conv2d(x, torch.tensor(k, dtype=torch.float64).expand(2, 1, 3, 3), padding=1, groups=2)
            torch.testing.assert_close(branch(x), want, rtol=0, atol=1e-12)


def test_ecb_has_one_bias_that_of_its_folded_conv() -> None:
    """Each ECB has exactly one bias, its 3x3 branch's, which the fold copies: five summed branch biases, each moving
    at Adam's step size, killed the ReLUs of whole layers (see models/ecb.py and the next test)."""
    ecb = ECB(3, 4).double()
    biases = [name for name, _ in ecb.named_parameters() if name.endswith("bias")]
    assert biases == ["conv3x3.bias"]
    with torch.no_grad():
        ecb.conv3x3.bias.copy_(torch.randn(4, dtype=torch.float64))
    torch.testing.assert_close(ecb.fold().bias, ecb.conv3x3.bias, rtol=0, atol=0)


def test_anchor_m_trained_with_adam_keeps_every_layer_alive() -> None:
    """anchor_m in its training form, 150 Adam steps at the config's learning rate (1e-3) on the embedded training
    patches, no distillation: no body layer may end with every ReLU at zero on a real batch. With one bias per ECB
    branch (ECBSR's form) the last body layer died within 50 steps on every seed tried, and the network output the
    nearest-neighbour image."""
    from pipeline.config import load_config
    from pipeline.training.train import batch_generator, load_train_patches

    torch.set_num_threads(1)
    patches = load_train_patches(load_config(), progress=False)
    torch.manual_seed(0)
    m = create_model("anchor_m", scale=4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for it in range(150):
        lr, hr = patches.sample(16, batch_generator(0, it))
        loss = (m(lr) - hr).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lr, _ = patches.sample(16, batch_generator(1, 0))
    with torch.no_grad():
        _, taps = m.forward_features(lr, list(range(m.num_taps)))
    alive = [float((t > 0).float().mean()) for t in taps]
    assert min(alive) > 0.02, alive

def test_fold_is_idempotent_and_leaves_the_original_alone() -> None:
    m = anchor(3).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = folded(m)
    assert folded(f) is f and f.fold() is f
    assert f.training and f.config == {**m.config, "folded": True}
    assert next(f.parameters()).dtype == torch.float64
    kinds = {type(mod) for mod in f.modules()}
    assert kinds == {AnchorNet, nn.ModuleList, nn.Conv2d, nn.PixelShuffle}
    assert sum(isinstance(mod, nn.Conv2d) for mod in f.modules()) == m.num_taps + 1
    assert all(mod.kernel_size == (3, 3) and mod.padding == (1, 1) for mod in f.modules() if isinstance(mod, nn.Conv2d))
    assert not m.is_folded and any(isinstance(mod, ECB) for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(folded(f)(x), f(x))
    edsr = create_model("tiny_student", scale=2)
    assert folded(edsr) is edsr and folded(create_model("rcan_student", scale=2, channels=16)).config["arch"] == "rcan"


def test_branched_training_reaches_every_branch() -> None:
    m = create_model("anchor_s", scale=2, channels=4, blocks=2).train()
    x = torch.rand(2, 3, 6, 6)
    sr, feats = m.forward_features(x, [0, 1])
    (sr.mean() + sum(f.mean() for f in feats)).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    # the fixed edge masks are not learnt and not stored
    assert not any("mask" in n for n, _ in m.named_parameters()) and not any("mask" in k for k in m.state_dict())


# ---------------------------------------------------------------- anchor and clamp


@pytest.mark.parametrize("scale", SCALES)
def test_anchor_alone_is_nearest_neighbour_upsampling(scale: int) -> None:
    m = zero_(create_model("anchor_m", scale=scale, channels=5, blocks=2))
    x = torch.rand(2, 3, 4, 6)
    with torch.no_grad():
        for net in (m, folded(m)):
            assert torch.equal(net(x), nearest(x, scale))


@pytest.mark.parametrize("scale", SCALES)
def test_output_is_clamped(scale: int) -> None:
    """All weights zero, the last conv's bias b: output = clamp(NN(x) + b placed by the pixel shuffle, 0, 1), where
    channel c * s^2 + i * s + j of the last conv lands on colour c at sub-pixel (i, j)."""
    s = scale
    bias = torch.linspace(-1.5, 1.5, 3 * s * s)
    x = torch.rand(1, 3, 3, 4)
    shift = torch.zeros(1, 3, 3 * s, 4 * s)
    for c in range(3):
        for i in range(s):
            for j in range(s):
                shift[0, c, i::s, j::s] = bias[c * s * s + i * s + j]
    want = (nearest(x, s) + shift).clamp(0, 1)
    branched = zero_(create_model("anchor_s", scale=s, channels=4, blocks=2))
    plain = zero_(create_model("anchor_s", scale=s, channels=4, blocks=2, folded=True))
    with torch.no_grad():
        branched.last.conv3x3.bias.copy_(bias)
        plain.last.bias.copy_(bias)
        for net in (branched, plain, folded(branched)):
            y = net(x)
            torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
            assert y.min() == 0 and y.max() == 1


# ---------------------------------------------------------------- taps, presets, configs


def test_features_shapes_and_values() -> None:
    m = create_model("anchor_l", scale=3, blocks=4, channels=12)
    assert (m.num_taps, m.channels, m.scale) == (4, 12, 3)
    x = torch.rand(2, 3, 7, 5)
    with torch.no_grad():
        sr, feats = m.forward_features(x, [3, 0, 2])
        manual, f = [], x
        for layer in m.body:
            f = torch.relu(layer(f))
            manual.append(f)
        assert torch.equal(sr, m(x)) and sr.shape == (2, 3, 21, 15)
    assert [t.shape for t in feats] == [(2, 12, 7, 5)] * 3
    for t, feat in zip([3, 0, 2], feats, strict=True):
        assert torch.equal(feat, manual[t])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_features(x, [4])
    assert folded(m).forward_features(x, [1])[1][0].shape == (2, 12, 7, 5)


def test_presets_and_overrides() -> None:
    sizes = {name: (p["blocks"], p["channels"]) for name, p in PRESETS.items() if p["arch"] == "anchor"}
    assert sizes == {"anchor_s": (4, 16), "anchor_m": (5, 28), "anchor_l": (7, 32)}
    m = create_model("anchor_m", scale=2, blocks=3, channels=8)
    assert m.config == {"arch": "anchor", "scale": 2, "channels": 8, "blocks": 3, "folded": False}
    assert build_model(m.config).config == m.config
    assert create_model("anchor_m", scale=2, folded=True).is_folded
    with pytest.raises(ValueError, match="unknown model option 'res_scale' for preset 'anchor_s'"):
        create_model("anchor_s", res_scale=0.5)
    with pytest.raises(ValueError, match="unknown model option 'folded' for preset 'tiny_student'"):
        create_model("tiny_student", folded=True)
    bad = [({"scale": 5}, "scale"), ({"channels": 0}, "channels"), ({"blocks": True}, "blocks"),
           ({"folded": "yes"}, "folded")]
    for kw, field in bad:
        with pytest.raises(ValueError, match=f"^{field}:"):
            create_model("anchor_s", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model config key.*groups"):
        build_model({"arch": "anchor", "scale": 2, "channels": 8, "blocks": 1, "groups": 2})
    with pytest.raises(ValueError, match="^arch: must be one of edsr, rcan, anchor, got 'swinir'"):
        build_model({"arch": "swinir", "scale": 2, "channels": 8, "blocks": 1})


def conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def ecb_params(cin: int, cout: int) -> int:
    conv = conv_params
    # 3x3 with the block's one bias; expand 1x1 to 2 cout + squeeze 3x3, both without bias; three edge branches:
    # 1x1 without bias + per-channel scale
    return conv(cin, cout, 3) + cin * 2 * cout + 2 * cout * cout * 9 + 3 * (cin * cout + cout)


@pytest.mark.parametrize("name", ["anchor_s", "anchor_m", "anchor_l"])
@pytest.mark.parametrize("scale", [2, 4])
def test_param_and_flop_counts_by_hand(name: str, scale: int) -> None:
    b, c = PRESETS[name]["blocks"], PRESETS[name]["channels"]
    out = 3 * scale * scale
    m = create_model(name, scale=scale)
    f = folded(m)
    plain = conv_params(3, c, 3) + (b - 1) * conv_params(c, c, 3) + conv_params(c, out, 3)
    branched = ecb_params(3, c) + (b - 1) * ecb_params(c, c) + ecb_params(c, out)
    assert count_params(f) == count_params(f, deployed=False) == plain
    assert count_params(create_model(name, scale=scale, folded=True)) == plain
    assert count_params(m) == plain  # the deployed count, like count_flops
    assert count_params(m, deployed=False) == branched == sum(p.numel() for p in m.parameters())
    h, w = 180, 320
    flops = 2 * h * w * 9 * (3 * c + (b - 1) * c * c + c * out)
    assert count_flops(f, (h, w)) == flops
    assert count_flops(m, (h, w)) == flops  # counted on the folded form
    assert not any(mod._forward_hooks for mod in m.modules()) and not m.is_folded


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_branched_and_folded(tmp_path: Path) -> None:
    m = anchor(3, dtype=torch.float32)
    f = folded(m)
    x = torch.rand(1, 3, 5, 6)
    for net, label in ((m, "branched"), (f, "folded")):
        path = save_checkpoint(tmp_path / f"{label}.pt", net, role="student")
        ckpt = load_checkpoint(path)  # torch.load(weights_only=True): plain dict metadata only
        assert ckpt["model"] == {"arch": "anchor", "scale": 3, "channels": 6, "blocks": 3,
                                 "folded": label == "folded"}
        back = model_from_checkpoint(path, expect_arch="anchor", expect_scale=3).eval()
        assert back.is_folded == (label == "folded")
        assert type(back.last) is (nn.Conv2d if label == "folded" else ECB)
        with torch.no_grad():
            assert torch.equal(back(x), net(x))
    # a branched checkpoint folds after loading to the same network as folding before saving
    with torch.no_grad():
        assert torch.equal(folded(model_from_checkpoint(tmp_path / "branched.pt"))(x), f(x))
    # the stored flag decides the structure: folded weights do not fit a branched model
    ckpt = load_checkpoint(tmp_path / "folded.pt")
    ckpt["model"]["folded"] = False
    with pytest.raises(CheckpointError, match="missing keys: body.0.conv3x3.weight"):
        model_from_checkpoint(ckpt)


# ---------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notes: fast, and opset 17
def test_onnx_export_of_folded_model_has_only_simple_ops() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = folded(anchor(3, channels=4, blocks=2, dtype=torch.float32))
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.rand(1, 3, 8, 6),), buf, input_names=["lr"], output_names=["sr"], opset_version=17,
                      dynamo=False, dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "h", 3: "w"}})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    nodes = proto.graph.node
    ops = [n.op_type for n in nodes]
    assert set(ops) <= {"Conv", "Relu", "Add", "Clip", "DepthToSpace", "Split", "Concat", "Constant"}, ops
    assert ops.count("Conv") == 3 and ops.count("Relu") == 2
    assert [ops.count(op) for op in ("Split", "Concat", "Add", "Clip", "DepthToSpace")] == [1, 1, 1, 1, 1]
    # the anchor: Split of the graph input into its 3 channels, one Concat of 27 (each channel 9 times in a row)
    split = next(n for n in nodes if n.op_type == "Split")
    concat = next(n for n in nodes if n.op_type == "Concat")
    assert split.input[0] == "lr" and len(split.output) == 3
    assert list(concat.input) == [o for o in split.output for _ in range(9)]
    d2s = next(n for n in nodes if n.op_type == "DepthToSpace")
    assert {a.name: a for a in d2s.attribute}["mode"].s == b"CRD"
    # Constants are only the scalar operands of Split / Clip
    consumers = {i: n.op_type for n in nodes for i in n.input}
    assert all(consumers[n.output[0]] in ("Split", "Clip") for n in nodes if n.op_type == "Constant")
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 7, 5)
    with torch.no_grad():
        want = m(x).numpy()
    got = session.run(None, {"lr": x.numpy()})[0]
    assert got.shape == (2, 3, 21, 15)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
