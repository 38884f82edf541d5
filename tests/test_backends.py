"""The runner interface: batching, tiling with seam blending, and the ONNX Runtime runner against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models import create_model
from pipeline.convert import export
from pipeline.backends.base import _origins, _ramp
from pipeline.backends.ort_runner import OrtRunner, provider_status
from pipeline.backends.torch_runner import TorchRunner
from pipeline.data.datasets import PairFolder
from pipeline.errors import UserError
from pipeline.metrics import psnr_y


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_student", scale=2).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return PairFolder("embedded", 2).load(0).lr[:70, :90]


def test_ramps_of_neighbouring_tiles_sum_to_one():
    n, overlap = 40, 16
    a, b = _ramp(n, overlap, False, True), _ramp(n, overlap, True, False)
    shared = a[n - overlap:] + b[:overlap]  # the second tile starts `overlap` before the first one ends
    np.testing.assert_allclose(shared, 1.0)
    assert a[:n - overlap].min() == 1.0 and a[-overlap // 4:].max() == 0.0  # the outer quarter is discarded
    assert _origins(100, 40, 16) == [0, 24, 48, 60] and _origins(40, 40, 16) == [0]


def test_tiled_output_equals_untiled(model, image):
    whole = TorchRunner(model).infer(image)
    for tile, overlap in ((32, 16), (48, 32)):
        tiled = TorchRunner(model, tile=tile, overlap=overlap, batch=3).infer(image)
        assert tiled.shape == whole.shape
        assert psnr_y(tiled, whole, 2) > 50  # far within the 0.05 dB a user could notice
    # An engine profile smaller than the image tiles it too.
    limited = TorchRunner(model, max_lr_hw=(40, 50), overlap=16).infer(image)
    assert psnr_y(limited, whole, 2) > 50


def test_seams_show_without_blending_margin(model, image):
    """The check above can fail: tiles that overlap by nothing differ visibly at the seams."""
    whole = TorchRunner(model).infer(image)
    no_overlap = TorchRunner(model, tile=30, overlap=0).infer(image)
    assert psnr_y(no_overlap, whole, 2) < psnr_y(TorchRunner(model, tile=30, overlap=16).infer(image), whole, 2)


def test_batches_give_the_same_images(model, image):
    runner = TorchRunner(model, batch=2)
    imgs = [image, image[:40, :30], image[10:50, 5:35], image[:33, :17]]
    together = runner.infer_many(imgs)
    for img, out in zip(imgs, together):
        assert out.shape == (img.shape[0] * 2, img.shape[1] * 2, 3)
        assert np.abs(out.astype(int) - TorchRunner(model).infer(img)).max() <= 1


def test_bad_settings_and_inputs(model, image):
    with pytest.raises(ValueError, match="larger than overlap"):
        TorchRunner(model, tile=16, overlap=16)
    with pytest.raises(ValueError, match="uint8 RGB"):
        TorchRunner(model).infer(image.astype(np.float32))
    with pytest.raises(ValueError, match="too small"):
        TorchRunner(model, max_lr_hw=(20, 20), overlap=32).infer(image)


def test_ort_runner_matches_torch_and_refuses_a_missing_provider(model, image, tmp_path):
    path = tmp_path / "s.onnx"
    export.export_fp32(model, path, export.model_meta(model, "a", "b"))
    with OrtRunner(path, "cpu", tile=40, overlap=16) as ort_runner:
        assert (ort_runner.backend, ort_runner.precision, ort_runner.scale) == ("onnxruntime-cpu", "fp32", 2)
        out = ort_runner.infer(image)
    assert np.abs(out.astype(int) - TorchRunner(model, tile=40, overlap=16).infer(image)).max() <= 1
    ok, reason = provider_status("cuda")
    if not ok:
        assert "CUDAExecutionProvider" in reason
        with pytest.raises(UserError, match="CUDAExecutionProvider"):
            OrtRunner(path, "cuda")
    assert onnx.load(str(path)).graph.input[0].name == "lr"
