"""models/: shapes, feature taps, presets, counts, checkpoints, published weights vs the published forward."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models import (
    FORMAT,
    PRESETS,
    CheckpointError,
    ModelConfig,
    build_model,
    count_flops,
    count_params,
    create_model,
    load_checkpoint,
    load_published,
    model_from_checkpoint,
    save_checkpoint,
)

MEAN = torch.tensor([0.4488, 0.4371, 0.4040])


def tiny(arch: str, scale: int, **kw: object) -> torch.nn.Module:
    cfg = {"arch": arch, "scale": scale, "channels": 8, "blocks": 2}
    if arch == "rcan":
        cfg |= {"groups": 3, "reduction": 4}
    torch.manual_seed(0)
    return build_model(cfg | kw).eval()


ARCH_SCALES = [(a, s) for a in ("edsr", "rcan") for s in (2, 3, 4)]


# ---------------------------------------------------------------- structure and taps


@pytest.mark.parametrize("arch,scale", ARCH_SCALES)
def test_output_shape(arch: str, scale: int) -> None:
    m = tiny(arch, scale)
    y = m(torch.rand(2, 3, 5, 7))
    assert y.shape == (2, 3, 5 * scale, 7 * scale) and y.dtype == torch.float32
    assert m.scale == scale and m.channels == 8
    assert m.num_taps == (2 if arch == "edsr" else 3)


@pytest.mark.parametrize("arch,scale", ARCH_SCALES)
def test_forward_features_matches_forward_and_manual_run(arch: str, scale: int) -> None:
    m = tiny(arch, scale)
    x = torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        y = m(x)
        taps = [m.num_taps - 1, 0, 1, 0]
        sr, feats = m.forward_features(x, taps)
        # Manual run through the same modules.
        h = m.head((x - MEAN.view(1, 3, 1, 1)) * 255)
        outs, f = [], h
        for block in m.body:
            f = block(f)
            outs.append(f)
        manual = m.last(m.upsample(m.body_tail(f) + h)) / 255 + MEAN.view(1, 3, 1, 1)
    assert torch.equal(sr, y)
    torch.testing.assert_close(y, manual, rtol=0, atol=1e-6)
    assert len(feats) == len(taps)
    for t, feat in zip(taps, feats):
        assert torch.equal(feat, outs[t])


def test_taps_keep_gradients_and_reject_bad_indices() -> None:
    m = tiny("edsr", 2)
    _, (feat,) = m.forward_features(torch.rand(1, 3, 4, 4), [1])
    feat.sum().backward()
    assert m.body[0].conv1.weight.grad is not None
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="out of range"):
            m.forward_features(torch.rand(1, 3, 4, 4), [bad])  # type: ignore[list-item]
    assert m.forward_features(torch.rand(1, 3, 4, 4), [])[1] == []


def test_forward_is_exportable() -> None:
    m = tiny("rcan", 4)
    x = torch.rand(1, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


def test_state_dict_has_no_mean_and_config_is_plain() -> None:
    m = tiny("rcan", 3, res_scale=0.5)
    assert not any("mean" in k for k in m.state_dict())
    cfg = m.config
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == {"arch": "rcan", "scale": 3, "channels": 8, "blocks": 2, "groups": 3, "res_scale": 0.5,
                   "reduction": 4}
    assert build_model(cfg).config == cfg


# ---------------------------------------------------------------- presets and validation


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name: str) -> None:
    m = create_model(name, scale=2)
    assert m.config["arch"] == PRESETS[name]["arch"] and m.scale == 2
    assert m.num_taps == (PRESETS[name]["groups"] if m.config["arch"] == "rcan" else PRESETS[name]["blocks"])


def test_published_sizes() -> None:
    # EDSR-baseline x4 ~1.5M, EDSR x4 ~43M, RCAN x4 ~15.6M parameters, as their papers report.
    assert round(count_params(create_model("edsr_baseline", scale=4)) / 1e5) == 15
    assert round(count_params(create_model("edsr", scale=4)) / 1e6) == 43
    assert round(count_params(create_model("rcan", scale=4)) / 1e5) == 156


def test_create_model_overrides_and_errors() -> None:
    m = create_model("tiny_student", scale=3, channels=4, blocks=1)
    assert (m.channels, m.num_taps, m.scale) == (4, 1, 3)
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny_student"):
        create_model("nope")
    with pytest.raises(ValueError, match="'widht'"):
        create_model("tiny_student", widht=3)
    with pytest.raises(ValueError, match="'arch'"):
        create_model("tiny_student", arch="rcan")
    bad = [({"scale": 5}, "scale"), ({"scale": 2.0}, "scale"), ({"channels": 0}, "channels"),
           ({"blocks": -1}, "blocks"), ({"res_scale": 0}, "res_scale"), ({"res_scale": float("nan")}, "res_scale"),
           ({"groups": 2}, "groups"), ({"channels": True}, "channels")]
    for kw, field in bad:
        with pytest.raises(ValueError, match=f"^{field}:"):
            create_model("tiny_student", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^reduction:"):
        create_model("rcan_student", scale=2, channels=8)
    with pytest.raises(ValueError, match="^arch:"):
        ModelConfig("srcnn", 2, 8, 1)
    with pytest.raises(ValueError, match="unknown model config key.*colour"):
        build_model({"arch": "edsr", "scale": 2, "channels": 8, "blocks": 1, "colour": 3})
    with pytest.raises(ValueError, match="missing model config key.*blocks"):
        build_model({"arch": "edsr", "scale": 2, "channels": 8})


# ---------------------------------------------------------------- counts


def test_count_params() -> None:
    m = tiny("rcan", 4)
    assert count_params(m) == sum(p.numel() for p in m.parameters())
    # EDSR by hand: head, 2 blocks of 2 convs, body tail, x2 upsampler (C -> 4C), last.
    c, n = 8, 2
    conv = lambda cin, cout, k=3: cin * cout * k * k + cout  # noqa: E731
    want = conv(3, c) + 2 * n * conv(c, c) + conv(c, c) + conv(c, 4 * c) + conv(c, 3)
    assert count_params(tiny("edsr", 2)) == want


def test_count_flops_by_hand() -> None:
    h, w, c = 5, 7, 8
    lr, hr = h * w, 16 * h * w
    # EDSR x4: MACs of each 3x3 conv = out_pixels * cout * cin * 9.
    macs = lr * 9 * (3 * c + 2 * 2 * c * c + c * c + c * 4 * c) + 4 * lr * 9 * c * 4 * c + hr * 9 * c * 3
    assert count_flops(tiny("edsr", 4), (h, w)) == 2 * macs
    # RCAN x2, 3 groups x 2 RCABs, reduction 4: channel attention = two 1x1 convs on a 1x1 map.
    g, b, s = 3, 2, c // 4
    macs = lr * 9 * (3 * c + g * (b * 2 + 1) * c * c + c * c + c * 4 * c) + g * b * 2 * c * s + 4 * lr * 9 * c * 3
    m = tiny("rcan", 2)
    assert count_flops(m, (h, w)) == 2 * macs
    # Counting leaves the model untouched and usable.
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert not any(mod._forward_hooks for mod in m.modules())
    assert m(torch.rand(1, 3, 4, 4)).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = tiny("rcan", 4)
    opt = torch.optim.Adam(m.parameters())
    m(torch.rand(1, 3, 4, 4)).mean().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", m, iteration=7, optimizer=opt.state_dict(),
                           train={"lr": 1e-4, "name": "x"})
    assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt.pt"]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["model"] == m.config and ckpt["iteration"] == 7
    assert ckpt["train"] == {"lr": 1e-4, "name": "x"}
    opt2 = torch.optim.Adam(m.parameters())
    opt2.load_state_dict(ckpt["optimizer"])
    x = torch.rand(1, 3, 5, 6)
    for source in (path, str(path), ckpt):
        m2 = model_from_checkpoint(source, expect_arch="rcan", expect_scale=4)
        assert torch.equal(m2(x), m(x))
    with pytest.raises(ValueError, match="state_dict"):
        save_checkpoint(tmp_path / "x.pt", m, state_dict={})


def test_checkpoint_wrong_arch_or_scale(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", tiny("edsr", 2))
    with pytest.raises(CheckpointError, match=r"c\.pt is arch=edsr scale=2, expected rcan scale=4"):
        model_from_checkpoint(path, expect_arch="rcan", expect_scale=4)
    with pytest.raises(CheckpointError, match="is arch=edsr scale=2, expected scale=3$"):
        model_from_checkpoint(path, expect_scale=3)
    model_from_checkpoint(path, expect_arch="edsr")
    # Weights that do not fit the stored config.
    ckpt = load_checkpoint(path)
    ckpt["state_dict"]["head.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(CheckpointError, match=r"head\.weight has shape \(8, 3, 5, 5\)"):
        model_from_checkpoint(ckpt)
    del ckpt["state_dict"]["last.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: last\.bias"):
        model_from_checkpoint(ckpt)


def test_corrupt_checkpoints(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", tiny("edsr", 2))
    data = good.read_bytes()
    files = {
        "truncated.pt": data[: len(data) // 2],
        "random.pt": os.urandom(4096),
        "text.pt": b"not a checkpoint at all\n",
        "empty.pt": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name} is not a readable PyTorch file"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="missing.pt: no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    torch.save({"head.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt is not a facd-pipeline checkpoint"):
        model_from_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "facd-pipeline-checkpoint/9", "model": {}, "state_dict": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="future.pt has format"):
        load_checkpoint(tmp_path / "future.pt")
    cfg = tiny("edsr", 2).config | {"scale": 7}
    torch.save({"format": FORMAT, "model": cfg, "state_dict": {}}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="invalid model config.*scale"):
        model_from_checkpoint(tmp_path / "cfg.pt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = {"format": FORMAT, "model": tiny("edsr", 2).config, "state_dict": {}, "extra": _Evil(marker)}
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt holds a pickled .*mkdir.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_published(tmp_path / "evil.pt", "edsr", 2)
    assert not marker.exists()


# ---------------------------------------------------------------- published weights
# State dicts are built here from the published key names, and the reference forwards below are written from those
# names with plain functional ops: neither uses models/published.py's mapping.


def _conv(sd: dict[str, Tensor], key: str, cin: int, cout: int, k: int = 3) -> None:
    sd[f"{key}.weight"] = torch.randn(cout, cin, k, k) / math.sqrt(cin * k * k)
    sd[f"{key}.bias"] = torch.randn(cout) * 0.1


def published_sd(layout: str, arch: str, scale: int, c: int = 8, n: int = 2, g: int = 3, r: int = 4) -> dict:
    torch.manual_seed(1)
    sd: dict[str, Tensor] = {}
    pt = layout == "edsr-pytorch"
    if pt:
        sd["sub_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
        sd["sub_mean.bias"] = -255 * MEAN
        sd["add_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
        sd["add_mean.bias"] = 255 * MEAN
    _conv(sd, "head.0" if pt else "conv_first", 3, c)
    if arch == "edsr":
        for i in range(n):
            _conv(sd, f"body.{i}.body.0" if pt else f"body.{i}.conv1", c, c)
            _conv(sd, f"body.{i}.body.2" if pt else f"body.{i}.conv2", c, c)
        _conv(sd, f"body.{n}" if pt else "conv_after_body", c, c)
    else:
        for gi in range(g):
            for b in range(n):
                p = f"body.{gi}.body.{b}.body" if pt else f"body.{gi}.residual_group.{b}.rcab"
                _conv(sd, f"{p}.0", c, c)
                _conv(sd, f"{p}.2", c, c)
                _conv(sd, f"{p}.3.conv_du.0" if pt else f"{p}.3.attention.1", c, c // r, 1)
                _conv(sd, f"{p}.3.conv_du.2" if pt else f"{p}.3.attention.3", c // r, c, 1)
            _conv(sd, f"body.{gi}.body.{n}" if pt else f"body.{gi}.conv", c, c)
        _conv(sd, f"body.{g}" if pt else "conv_after_body", c, c)
    up = "tail.0" if pt else "upsample"
    if scale == 4:
        _conv(sd, f"{up}.0", c, 4 * c)
        _conv(sd, f"{up}.2", c, 4 * c)
    else:
        _conv(sd, f"{up}.0", c, scale * scale * c)
    _conv(sd, "tail.1" if pt else "conv_last", c, 3)
    return sd


def reference_forward(sd: dict, layout: str, arch: str, scale: int, x: Tensor, res_scale: float = 1.0) -> Tensor:
    """The published forward, straight from the published key names."""
    pt = layout == "edsr-pytorch"

    def conv(t: Tensor, key: str) -> Tensor:
        w = sd[f"{key}.weight"]
        return F.conv2d(t, w, sd[f"{key}.bias"], padding=w.shape[-1] // 2)

    def ca(t: Tensor, down: str, up: str) -> Tensor:
        return t * torch.sigmoid(conv(F.relu(conv(F.adaptive_avg_pool2d(t, 1), down)), up))

    if pt:  # EDSR-PyTorch: input in [0, 255], MeanShift convs
        x = conv(x * 255, "sub_mean")
    else:  # BasicSR
        x = (x - MEAN.view(1, 3, 1, 1)) * 255
    head = conv(x, "head.0" if pt else "conv_first")
    r = head
    if arch == "edsr":
        n = 0
        while (f"body.{n}.body.0.weight" if pt else f"body.{n}.conv1.weight") in sd:
            n += 1
        for i in range(n):
            k1, k2 = (f"body.{i}.body.0", f"body.{i}.body.2") if pt else (f"body.{i}.conv1", f"body.{i}.conv2")
            r = r + res_scale * conv(F.relu(conv(r, k1)), k2)
        r = conv(r, f"body.{n}" if pt else "conv_after_body")
    else:
        g = 0
        while (f"body.{g}.body.0.body.0.weight" if pt else f"body.{g}.conv.weight") in sd:
            g += 1
        n = 0
        while (f"body.0.body.{n}.body.0.weight" if pt else f"body.0.residual_group.{n}.rcab.0.weight") in sd:
            n += 1
        for gi in range(g):
            gin = r
            for b in range(n):
                if pt:  # EDSR-PyTorch's RCAB ignores res_scale
                    p = f"body.{gi}.body.{b}.body"
                    r = r + ca(conv(F.relu(conv(r, f"{p}.0")), f"{p}.2"), f"{p}.3.conv_du.0", f"{p}.3.conv_du.2")
                else:
                    p = f"body.{gi}.residual_group.{b}.rcab"
                    y = ca(conv(F.relu(conv(r, f"{p}.0")), f"{p}.2"), f"{p}.3.attention.1", f"{p}.3.attention.3")
                    r = r + res_scale * y
            r = gin + conv(r, f"body.{gi}.body.{n}" if pt else f"body.{gi}.conv")
        r = conv(r, f"body.{g}" if pt else "conv_after_body")
    r = r + head
    up = "tail.0" if pt else "upsample"
    if scale == 4:
        r = F.pixel_shuffle(conv(F.pixel_shuffle(conv(r, f"{up}.0"), 2), f"{up}.2"), 2)
    else:
        r = F.pixel_shuffle(conv(r, f"{up}.0"), scale)
    r = conv(r, "tail.1" if pt else "conv_last")
    if pt:
        return conv(r, "add_mean") / 255
    return r / 255 + MEAN.view(1, 3, 1, 1)


PUBLISHED_CASES = [(lay, a, s) for lay in ("edsr-pytorch", "basicsr")
                   for a, s in [("edsr", 2), ("edsr", 3), ("edsr", 4), ("rcan", 2), ("rcan", 4)]]


@pytest.mark.parametrize("layout,arch,scale", PUBLISHED_CASES)
def test_published_matches_reference(layout: str, arch: str, scale: int) -> None:
    sd = published_sd(layout, arch, scale)
    src = {"params": sd} if layout == "basicsr" else sd
    m = load_published(src, arch, scale).eval()
    want = {"channels": 8, "blocks": 2} | ({"groups": 3, "reduction": 4} if arch == "rcan" else {})
    assert {k: m.config[k] for k in want} == want
    x = torch.rand(2, 3, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(sd, layout, arch, scale, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,arch", [("edsr-pytorch", "edsr"), ("basicsr", "edsr"), ("basicsr", "rcan")])
def test_published_res_scale(layout: str, arch: str) -> None:
    sd = published_sd(layout, arch, 2)
    m = load_published(sd, arch, 2, res_scale=0.1)
    x = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(sd, layout, arch, 2, x, 0.1), rtol=1e-5, atol=1e-5)
    if layout == "edsr-pytorch":
        with pytest.raises(ValueError, match="res_scale"):
            load_published(published_sd(layout, "rcan", 2), "rcan", 2, res_scale=0.1)


def test_published_from_file_params_ema_and_module_prefix(tmp_path: Path) -> None:
    ema = published_sd("basicsr", "rcan", 2)
    plain = {k: torch.zeros_like(v) for k, v in ema.items()}
    torch.save({"params": plain, "params_ema": {f"module.{k}": v for k, v in ema.items()}}, tmp_path / "b.pth")
    m = load_published(tmp_path / "b.pth", "rcan", 2)
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(ema, "basicsr", "rcan", 2, x), rtol=1e-5, atol=1e-5)
    sd = published_sd("edsr-pytorch", "edsr", 3)
    m = load_published({f"module.{k}": v for k, v in sd.items()}, "edsr", 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(sd, "edsr-pytorch", "edsr", 3, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["edsr-pytorch", "basicsr"])
def test_published_errors(layout: str, tmp_path: Path) -> None:
    pt = layout == "edsr-pytorch"
    block = "body.1.body.2.weight" if pt else "body.1.conv2.weight"
    sd = published_sd(layout, "edsr", 2)
    bad = dict(sd, **{block: torch.zeros(8, 8, 1, 1)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(block)} has shape \(8, 8, 1, 1\), expected \(8, 8, 3, 3\)"):
        load_published(bad, "edsr", 2)
    last = "tail.1.bias" if pt else "conv_last.bias"
    bad = {k: v for k, v in sd.items() if k != last}
    with pytest.raises(CheckpointError, match=f"missing keys: {last}"):
        load_published(bad, "edsr", 2)
    with pytest.raises(CheckpointError, match="unexpected keys: extra.weight"):
        load_published(dict(sd, **{"extra.weight": torch.zeros(1)}), "edsr", 2)
    with pytest.raises(CheckpointError, match="look like edsr.*expected rcan"):
        load_published(sd, "rcan", 2)
    with pytest.raises(CheckpointError, match="are for scale 2, expected scale 4"):
        load_published(sd, "edsr", 4)
    with pytest.raises(CheckpointError, match="are for scale 2, expected scale 3"):
        load_published(sd, "edsr", 3)
    with pytest.raises(CheckpointError, match="has shape"):
        load_published(sd, "edsr", 2, channels=16)
    with pytest.raises(ValueError, match="'width'"):
        load_published(sd, "edsr", 2, width=16)
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_published({"conv.weight": torch.zeros(1)}, "edsr", 2)
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        load_published(tmp_path / "nope.pth", "edsr", 2)
    if pt:  # a MeanShift for rgb_range 1 (or another mean) would silently shift the output
        bad = dict(sd, **{"sub_mean.bias": -MEAN})
        with pytest.raises(CheckpointError, match="sub_mean is not the standard MeanShift"):
            load_published(bad, "edsr", 2)
        bad = dict(sd, **{"add_mean.weight": 2 * torch.eye(3).view(3, 3, 1, 1)})
        with pytest.raises(CheckpointError, match="add_mean is not the standard MeanShift"):
            load_published(bad, "edsr", 2)


@pytest.mark.parametrize("layout", ["edsr-pytorch", "basicsr"])
@pytest.mark.parametrize("arch, scale", [("edsr", 3), ("rcan", 4)])
def test_load_model_detects_published_arch_and_scale(layout: str, arch: str, scale: int, tmp_path: Path) -> None:
    from pipeline.modelio import load_model

    sd = published_sd(layout, arch, scale)
    path = tmp_path / "published.pth"
    torch.save({"params_ema": sd} if layout == "basicsr" else sd, path)
    model = load_model(path)
    assert (model.config["arch"], model.scale) == (arch, scale)
    x = torch.rand(1, 3, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, layout, arch, scale, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=f"are for scale {scale}, expected scale 2"):
        load_model(path, scale=2)
