"""Shared fixtures: a run directory with an exported and quantized tiny student (random weights, seconds to make)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import create_model, save_checkpoint
from pipeline.cli import main

SMALL_CALIB = ["--set", "quant.calib_count=12", "--set", "quant.calib_crop=24", "--set", "quant.calib_holdout=4"]


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """student.pt, student.{fp32,fp16,int8,int8-cpu}.onnx, calib.npz and the manifest. Tests that change it copy it."""
    root = tmp_path_factory.mktemp("exported") / "run"
    torch.manual_seed(0)
    save_checkpoint(root / "student.pt", create_model("tiny_student", scale=4))
    assert main(["-q", "export", "--run-dir", str(root)]) == 0
    assert main(["-q", "quantize", "--run-dir", str(root), *SMALL_CALIB]) == 0
    return root
