"""INT8 quantization: the calibration set, the QDQ graph against a PyTorch fake-quantization oracle, the QDQ rule
check on deliberately broken graphs, and the sensitivity-guided choice of layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from models import create_model
from pipeline import machine
from pipeline.convert import export, quantize
from pipeline.data.datasets import PairFolder, PatchSampler
from pipeline.errors import UserError

SCALE = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _briefly_trained()
    out = tmp_path_factory.mktemp("quant")
    fp32 = out / "s.fp32.onnx"
    export.export_fp32(model, fp32, export.model_meta(model, "a", "b"))
    fp16 = export.to_fp16(onnx.load(str(fp32)))
    calib = quantize.calibration_set("embedded-train", SCALE, 12, 24, 4, seed=0)
    amax = quantize.activation_amax(fp32, calib["lr"][~calib["holdout"]], "minmax", 99.99)
    return model, fp32, fp16, calib, amax


def _briefly_trained() -> torch.nn.Module:
    """A tiny student after 150 L1 steps: enough for PSNR against HR to mean something."""
    torch.manual_seed(0)
    model = create_model("tiny_student", scale=SCALE)
    sampler = PatchSampler(list(PairFolder("embedded-train", SCALE)), 24, SCALE)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        lr, hr = sampler.sample(8, gen)
        loss = torch.nn.functional.l1_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _run_all(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"lr": x})


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == name)


def test_calibration_set_is_distinct_seeded_and_sized():
    a = quantize.calibration_set("embedded-train", 4, 20, 16, 5, seed=1)
    b = quantize.calibration_set("embedded-train", 4, 20, 16, 5, seed=1)
    c = quantize.calibration_set("embedded-train", 4, 20, 16, 5, seed=2)
    assert a["lr"].shape == (20, 16, 16, 3) and a["hr"].shape == (20, 64, 64, 3) and a["lr"].dtype == np.uint8
    assert a["holdout"].sum() == 5 and not a["holdout"][:15].any()
    np.testing.assert_array_equal(a["lr"], b["lr"])
    assert not np.array_equal(a["lr"], c["lr"])
    assert len({crop.tobytes() for crop in a["lr"]}) == 20
    # Each HR crop is the HR of its LR crop: bicubic-downscaling it gives the LR crop back (up to border effects).
    from pipeline.data.imresize import imresize

    inner = (slice(4, -4), slice(4, -4))
    down = np.clip(np.round(imresize(a["hr"][0].astype(np.float64), 1 / 4)), 0, 255)
    assert np.abs(down[inner] - a["lr"][0][inner]).mean() < 1.0


def test_calibration_set_smaller_than_requested_is_refused(tmp_path):
    with pytest.raises(UserError, match="yields only .* distinct 96x96 LR crops"):
        quantize.calibration_set("embedded-train", 4, 40, 96, 4, seed=0)
    calib = quantize.calibration_set("embedded-train", 4, 10, 16, 2, seed=0)
    with open(tmp_path / "calib.npz", "wb") as f:
        np.savez(f, **calib)
    with pytest.raises(UserError, match="holds 10 crops, quant.calib_count asks for 20"):
        quantize.load_calibration(tmp_path / "calib.npz", 20, 16, 4)
    with pytest.raises(UserError, match="made for x4"):
        quantize.load_calibration(tmp_path / "calib.npz", 10, 16, 2)
    assert quantize.load_calibration(tmp_path / "calib.npz", 10, 16, 4)["lr"].shape == (10, 16, 16, 3)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a calibration set"):
        quantize.load_calibration(tmp_path / "bad.npz", 10, 16, 4)


def test_one_quantized_conv_matches_a_fake_quantization_oracle(setup):
    model, _, fp16, calib, amax = setup
    layer = "body.1.conv1"
    x_in = next(n.input[0] for n in export.conv_nodes(fp16) if n.name == layer)
    coarse = {**amax, x_in: amax[x_in] * 30}  # a coarse activation grid, so quantization clearly shows
    q = quantize.quantize(fp16, coarse, {layer})
    assert quantize.check_qdq(q) == []
    node = next(n for n in q.graph.node if n.name == layer)
    x_name = node.input[0].removesuffix("_dq")
    w_name = node.input[1].removesuffix("_dq")
    w16 = _init(fp16, w_name).astype(np.float64)
    expected_w_scale = (np.abs(w16.reshape(len(w16), -1)).max(axis=1) / 127).astype(np.float16)
    np.testing.assert_array_equal(_init(q, f"{w_name}_qscale"), expected_w_scale)
    s_x = float(_init(q, f"{x_name}_qscale"))
    assert x_name == x_in and s_x == pytest.approx(coarse[x_name] / 127, rel=1e-3)
    assert all(not _init(q, f"{t}_qzero").any() for t in (x_name, w_name))

    # Expose the conv's FP16 input (before Q) and output, and redo Q -> DQ -> Conv in float64 from that input.
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT16, None)
                               for t in (x_name, node.output[0])])
    x = calib["lr"][:4].transpose(0, 3, 1, 2).astype(np.float32) / 255
    _, xin, yconv = _run_all(probe, x)
    s_w = expected_w_scale.astype(np.float64).reshape(-1, 1, 1, 1)
    xq = np.clip(np.round(xin.astype(np.float64) / s_x), -128, 127) * s_x
    wq = np.clip(np.round(w16 / s_w), -128, 127) * s_w
    bias = _init(fp16, node.input[2]).astype(np.float64)
    oracle = torch.nn.functional.conv2d(torch.from_numpy(xq), torch.from_numpy(wq), torch.from_numpy(bias),
                                        padding=1).numpy()
    assert len(np.unique(xq)) < 60  # the coarse grid is really applied (an FP16 input has thousands of values)
    np.testing.assert_allclose(yconv.astype(np.float64), oracle, rtol=0, atol=2e-3 * np.abs(oracle).max())


def test_the_qdq_check_catches_every_broken_rule(setup):
    _, _, fp16, _, amax = setup
    names = [n.name for n in export.conv_nodes(fp16)]
    clean = quantize.quantize(fp16, amax, names)
    assert quantize.check_qdq(clean) == []
    assert quantize.check_qdq(fp16) == []

    def broken(edit) -> list[str]:
        proto = onnx.ModelProto()
        proto.CopyFrom(clean)
        edit(proto)
        return quantize.check_qdq(proto)

    def nonzero_zero_point(p):
        zp = next(i for i in p.graph.initializer if i.name.endswith("_qzero") and not i.dims)
        zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))

    def uint8_zero_point(p):
        zp = next(i for i in p.graph.initializer if i.name.endswith("_qzero") and not i.dims)
        zp.CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), zp.name))

    def axis_one(p):
        dq = next(n for n in p.graph.node if n.op_type == "DequantizeLinear" and n.attribute)
        dq.attribute[0].i = 1

    def int32_bias(p):
        conv = next(n for n in p.graph.node if n.op_type == "Conv")
        bias = next(i for i in p.graph.initializer if i.name == conv.input[2])
        p.graph.initializer.extend([numpy_helper.from_array(np.zeros(bias.dims, np.int32), "b_q"),
                                    numpy_helper.from_array(np.array(0.1, np.float16), "b_s"),
                                    numpy_helper.from_array(np.array(0, np.int32), "b_z")])
        p.graph.node.insert(0, helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b_dq"], name="bias_dq"))
        conv.input[2] = "b_dq"

    def quantized_output(p):
        last = p.graph.node[-1]  # the Cast that produces `sr`
        last.output[0] = "sr_pre"
        p.graph.initializer.extend([numpy_helper.from_array(np.array(0.01, np.float32), "o_s"),
                                    numpy_helper.from_array(np.array(0, np.int8), "o_z")])
        p.graph.node.extend([helper.make_node("QuantizeLinear", ["sr_pre", "o_s", "o_z"], ["sr_q"], name="out_q"),
                             helper.make_node("DequantizeLinear", ["sr_q", "o_s", "o_z"], ["sr"], name="out_dq")])

    def around_depth_to_space(p):
        d2s = next(n for n in p.graph.node if n.op_type == "DepthToSpace")
        src = d2s.input[0]
        p.graph.initializer.extend([numpy_helper.from_array(np.array(0.01, np.float16), "d_s"),
                                    numpy_helper.from_array(np.array(0, np.int8), "d_z")])
        at = list(p.graph.node).index(d2s)
        p.graph.node.insert(at, helper.make_node("DequantizeLinear", ["d_q", "d_s", "d_z"], ["d_dq"], name="d_dq"))
        p.graph.node.insert(at, helper.make_node("QuantizeLinear", [src, "d_s", "d_z"], ["d_q"], name="d_q"))
        d2s.input[0] = "d_dq"

    cases = {"zero point must be INT8 0, got int8 [3]": nonzero_zero_point,
             "zero point must be INT8 0, got uint8": uint8_zero_point,
             "per-channel axis is 1, must be 0": axis_one,
             "dequantizes an INT32 tensor (bias)": int32_bias,
             "quantizes a graph output": quantized_output,
             "DepthToSpace node_pixel_shuffle": around_depth_to_space}
    for expected, edit in cases.items():
        errors = broken(edit)
        assert any(expected in e for e in errors), (expected, errors)


def test_sensitivity_keeps_the_layer_that_hurts_in_fp16(setup):
    _, fp32, fp16, calib, amax = setup
    hold = calib["holdout"]
    lr, hr = calib["lr"][hold], calib["hr"][hold]
    names = [n.name for n in export.conv_nodes(fp16)]

    def choose(ranges: dict[str, float], max_drop_db: float) -> dict:
        return quantize.choose_layers(names, lambda layers: quantize.quantize(fp16, ranges, layers), fp32, lr, hr,
                                      SCALE, max_drop_db, progress=False)

    easy = choose(amax, 100.0)
    assert easy["reached"] and easy["float_layers"] == [] and easy["int8_layers"] == names
    assert easy["drop_db"] == easy["all_int8_drop_db"] and len(easy["steps"]) == 1
    assert sorted(r["rank"] for r in easy["layers"]) == list(range(1, len(names) + 1))

    victim = next(n for n in export.conv_nodes(fp16) if n.name == "body.0.conv2")
    crushed = {**amax, victim.input[0]: amax[victim.input[0]] / 200}  # clips nearly every activation
    result = choose(crushed, 0.2)
    table = {r["layer"]: r for r in result["layers"]}
    assert table["body.0.conv2"]["rank"] == 1 and table["body.0.conv2"]["cost_db"] > 0.4
    assert result["all_int8_drop_db"] > 0.4
    assert "body.0.conv2" in result["float_layers"] and result["reached"] and result["drop_db"] <= 0.2

    impossible = choose(amax, -1.0)
    assert not impossible["reached"] and len(impossible["int8_layers"]) == 1
    assert [s["kept_float"] for s in impossible["steps"]][-1] == impossible["float_layers"]


def _host_int8() -> str:
    """How this CPU's ONNX Runtime U8S8 kernels multiply (machine.int8_dot_product), for the assertions that depend
    on the host's integer arithmetic."""
    return machine.int8_dot_product(machine.cpu_info()["flags"])


def vpmaddubsw_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What a U8S8 GEMM built on VPMADDUBSW (AVX2, AVX-512 without VNNI) computes: u8 (M, K) x s8 (K, N), each pair
    of products along K (k = 2j, 2j + 1; K zero-padded to even) summed into a saturating int16, then widened and
    summed exactly."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = np.einsum("mjp,jpn->mjn", a.reshape(len(a), -1, 2), b.reshape(-1, 2, b.shape[1]))
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def test_the_vpmaddubsw_oracle_saturates_pairs_and_only_pairs():
    a = np.array([[255, 255, 255, 255, 1]], np.uint8)
    b = np.array([[127], [127], [-128], [-128], [5]], np.int8)
    # pairs: 255*127*2 = 64770 -> 32767; 255*-128*2 = -65280 -> -32768; the odd tail 1*5 pairs with the padding
    assert vpmaddubsw_matmul(a, b).tolist() == [[32767 - 32768 + 5]]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (7, 33), dtype=np.uint8)
    b7 = rng.integers(-64, 65, (33, 5), dtype=np.int8)  # 7-bit weights: a pair reaches at most 2 * 255 * 64 = 32640
    np.testing.assert_array_equal(vpmaddubsw_matmul(a, b7), a.astype(np.int64) @ b7.astype(np.int64))
    b8 = np.full((33, 5), 127, np.int8)
    assert (vpmaddubsw_matmul(a, b8) < a.astype(np.int64) @ b8.astype(np.int64)).any()


def _matmul_integer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, a.shape),
                           helper.make_tensor_value_info("b", onnx.TensorProto.INT8, b.shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b})[0]


@pytest.mark.parametrize("shape", [(4, 8, 8), (16, 27, 16), (64, 576, 64)])
def test_onnx_runtime_u8s8_arithmetic_on_this_cpu(shape):
    """ONNX Runtime offers no switch to run its AVX2 kernels on a VNNI CPU: here it is checked against what this
    CPU's kind should compute (the VPMADDUBSW oracle on AVX2 / AVX-512 without VNNI, exact int32 on VNNI / AMX)."""
    kind = _host_int8()
    if kind == "unknown":
        pytest.skip("not an x86 CPU with AVX2: no known U8S8 arithmetic to expect")
    m, k, n = shape
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    got = _matmul_integer(a, b)
    if kind == "vpmaddubsw":  # expected: bit-exact with the oracle, and saturated somewhere on these random values
        np.testing.assert_array_equal(got, vpmaddubsw_matmul(a, b))
        assert not np.array_equal(got, exact)
    else:
        np.testing.assert_array_equal(got, exact)
    b7 = np.clip(b, -64, 64)  # 7-bit weights: exact on every kind of CPU
    np.testing.assert_array_equal(_matmul_integer(a, b7), a.astype(np.int64) @ b7.astype(np.int64))


def _cpu_model(setup, tmp_path, layers=None) -> onnx.ModelProto:
    _, fp32, fp16, calib, _ = setup
    names = [n.name for n in export.conv_nodes(fp16)]
    twin = quantize.cpu_twin_quantizer(fp32, calib["lr"][~calib["holdout"]], "minmax", 99.99, tmp_path)
    return twin(set(names) if layers is None else layers)


def _session(proto: onnx.ModelProto, exact_arithmetic: bool = False, optimized: str = "") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact_arithmetic:  # Q/DQ as float ops: what exact integer arithmetic computes
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_cpu_model_is_u8s8_with_7bit_weights_and_every_quantized_conv_becomes_an_integer_kernel(setup, tmp_path):
    _, fp32, fp16, calib, _ = setup
    names = [n.name for n in export.conv_nodes(fp16)]
    proto = _cpu_model(setup, tmp_path, set(names) - {"last"})
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8-cpu" and meta["int8_cpu_weights"] == "7-bit (-64..64)"
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    zero_points = [inits[n.input[2]] for n in dq if n.input[0] not in inits]  # activations
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    weight_dq = [n for n in dq if n.input[0] in inits and inits[n.input[0]].dtype == np.int8]
    assert weight_dq and all(not inits[n.input[2]].any() and inits[n.input[1]].size > 1 for n in weight_dq)
    # Symmetric per-channel 7-bit: every output channel's largest weight maps to +-64.
    for n in weight_dq:
        w = np.abs(inits[n.input[0]].astype(np.int64)).reshape(len(inits[n.input[0]]), -1).max(axis=1)
        assert w.max() == quantize.CPU_WEIGHT_QMAX and (w[w > 0] >= quantize.CPU_WEIGHT_QMAX - 1).all()
    last = next(n for n in proto.graph.node if n.op_type == "Conv" and n.name == "last")
    assert all(n.output[0] not in last.input for n in dq)  # the layer left out stays FP32
    # The TensorRT rules do not hold for this model (unsigned activations), which is why they are checked on the
    # TensorRT model only.
    assert any("zero point must be INT8 0, got uint8" in e for e in quantize.check_qdq(proto))

    session = _session(proto, optimized=str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == len(names) - 1 and ops.count("Conv") + ops.count("FusedConv") == 1
    x = calib["lr"][:2].transpose(0, 3, 1, 2).astype(np.float32) / 255
    integer = session.run(None, {"lr": x})[0]
    exact = _session(proto, exact_arithmetic=True).run(None, {"lr": x})[0]
    assert _psnr(integer, _run_all(onnx.load(str(fp32)), x)[0]) > 35  # close to FP32
    # On every x86 CPU this CPU's integer kernels compute what exact arithmetic does (up to the float rounding of
    # requantization): on AVX2 / AVX-512 without VNNI because 7-bit weights never saturate VPMADDUBSW's int16.
    assert _psnr(integer, exact) > 60


def _conv_gemms(proto: onnx.ModelProto, x: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """For every integer Conv of a U8S8 QDQ model: its name, its u8 input as im2col rows in the channels-last order
    (ky, kx, c) of ONNX Runtime's QLinearConv (padding = the zero point), and its s8 weights as (K, Cout)."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = []
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        x_dq, w_dq = producer.get(conv.input[0]), producer.get(conv.input[1])
        if x_dq is not None and x_dq.op_type == w_dq.op_type == "DequantizeLinear":
            convs.append((conv, x_dq.input[0], int(inits[x_dq.input[2]]), inits[w_dq.input[0]]))
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.UINT8, None) for _, t, _, _ in convs])
    u8_inputs = _session(probe, exact_arithmetic=True).run([t for _, t, _, _ in convs], {"lr": x})
    out = []
    for (conv, _, zero, w), xq in zip(convs, u8_inputs):
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        assert list(attrs.get("strides", [1, 1])) == [1, 1] and attrs.get("group", 1) == 1
        kh, kw = w.shape[2:]
        pad = attrs.get("pads", [0, 0, 0, 0])[0]
        xp = np.pad(xq, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=zero).transpose(0, 2, 3, 1)
        h, wd = xq.shape[2], xq.shape[3]
        cols = np.stack([xp[:, y:y + h, x:x + wd, :] for y in range(kh) for x in range(kw)], axis=3)
        out.append((conv.name, cols.reshape(-1, cols.shape[3] * cols.shape[4]),
                    w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])))
    return out


def test_cpu_model_is_exact_under_avx2_arithmetic_on_any_cpu(setup, tmp_path):
    """The AVX2 case without an AVX2 CPU: every integer Conv of the CPU model, on its real u8 inputs, through the
    VPMADDUBSW oracle gives the exact integer result; the same Convs with 8-bit weights would not."""
    _, _, _, calib, _ = setup
    x = calib["lr"][:1].transpose(0, 3, 1, 2).astype(np.float32) / 255
    gemms = _conv_gemms(_cpu_model(setup, tmp_path), x)
    assert len(gemms) == len(export.conv_nodes(setup[2]))
    saturated_8bit = []
    for name, cols, w7 in gemms:
        np.testing.assert_array_equal(vpmaddubsw_matmul(cols, w7), cols.astype(np.int64) @ w7.astype(np.int64),
                                      err_msg=name)
        w8 = np.clip(np.round(w7.astype(np.float64) * 127 / quantize.CPU_WEIGHT_QMAX), -127, 127).astype(np.int8)
        if not np.array_equal(vpmaddubsw_matmul(cols, w8), cols.astype(np.int64) @ w8.astype(np.int64)):
            saturated_8bit.append(name)
    assert saturated_8bit  # the oracle does see what 8-bit weights would suffer on AVX2


def test_cpu_model_of_an_anchor_net_runs_no_float_op_between_its_integer_kernels(tmp_path):
    """The anchor family's CPU INT8 model, as ONNX Runtime's CPU provider optimizes it: every Conv an integer kernel
    with its Relu gone into the output range, the anchor's Concat and Add integer kernels, and float only at the two
    ends (one QuantizeLinear of the input, one DequantizeLinear of the output)."""
    torch.manual_seed(0)
    model = create_model("anchor_s", scale=2, folded=True).eval()
    fp32 = tmp_path / "anchor.fp32.onnx"
    export.export_fp32(model, fp32, export.model_meta(model, "", ""), simplify=True)
    lr = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    proto = quantize.cpu_twin_quantizer(fp32, lr, "minmax", 99.99, tmp_path)({n.name for n in export.conv_nodes(
        onnx.load(str(fp32)))})
    _session(proto, optimized=str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 5 and "Relu" not in ops and "Conv" not in ops and "FusedConv" not in ops, ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    assert {"QLinearAdd", "QLinearConcat"} <= set(ops), ops


def test_image_bias_correction_changes_only_that_bias_and_removes_the_mean_shift_on_held_out_crops(tmp_path):
    """Rounding weights to INT8 moves the mean of every output plane; `image_bias_corrected` measures that shift on
    the calibration crops and lowers the image Conv's bias by it. Oracle: the bias moves by exactly the shift
    measured here in float64, nothing else in the model changes, and on crops the correction never saw the
    per-plane mean shift shrinks several times (an anchor student after 300 L1 steps at x4)."""
    torch.manual_seed(0)
    model = create_model("anchor_s", scale=4)
    sampler = PatchSampler(list(PairFolder("embedded-train", 4)), 24, 4)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        lr, hr = sampler.sample(8, gen)
        loss = torch.nn.functional.l1_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fp32 = tmp_path / "anchor.fp32.onnx"
    export.export_fp32(model.eval(), fp32, export.model_meta(model, "", ""))
    fp16 = export.to_fp16(onnx.load(str(fp32)))
    calib = quantize.calibration_set("embedded-train", 4, 48, 24, 12, seed=0)
    calib_lr, held_lr = calib["lr"][~calib["holdout"]], calib["lr"][calib["holdout"]]
    amax = quantize.activation_amax(fp32, calib_lr, "minmax", 99.99)
    layers = {n.name for n in export.conv_nodes(fp16)}
    made = []

    def quantized(m: onnx.ModelProto) -> onnx.ModelProto:
        made.append(quantize.quantize(m, amax, layers))
        return made[-1]

    corrected = quantize.image_bias_corrected(fp16, quantized, calib_lr)
    plain, image = made[0], export.conv_nodes(fp16)[-1]
    assert len(made) == 2 and corrected is made[1]

    def planes(proto: onnx.ModelProto, lr: np.ndarray) -> np.ndarray:
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        probe.graph.output.append(helper.make_tensor_value_info(image.output[0], onnx.TensorProto.FLOAT16, None))
        x = lr.transpose(0, 3, 1, 2).astype(np.float32) / 255
        return _session(probe, exact_arithmetic=True).run([image.output[0]], {"lr": x})[0].astype(np.float64)

    shift = (planes(plain, calib_lr) - planes(fp16, calib_lr)).mean(axis=(0, 2, 3))
    before, after = ({i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (plain, corrected))
    bias = image.input[2]
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before if k != bias)
    np.testing.assert_allclose(after[bias].astype(np.float64), before[bias].astype(np.float64) - shift,
                               atol=2e-3 * np.abs(before[bias]).max())  # FP16 bias: its own rounding
    held_shift = [np.sqrt(np.mean((planes(m, held_lr) - planes(fp16, held_lr)).mean(axis=(0, 2, 3)) ** 2))
                  for m in (plain, corrected)]
    assert held_shift[1] < held_shift[0] / 4, held_shift
