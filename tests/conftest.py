"""Shared fixtures: a run directory with an exported and quantized tiny student (random weights, seconds to make)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from models import create_model, save_checkpoint
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
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


def load_script(relative: str) -> ModuleType:
    """A maintainer's script outside the package (benchmarks/...), imported by path."""
    path = ROOT / relative
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
