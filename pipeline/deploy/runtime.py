"""The torch-free runtime that bundles and probe folders carry: this package's Python files, no data.

`python -m pipeline.edge` and `python -m pipeline.budget probe` run from that copy (`PYTHONPATH=runtime`) and import
only numpy, Pillow and the runtime (ONNX Runtime, OpenVINO or TensorRT) beside the standard library.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
EXCLUDE = {"data/build_embedded.py"}  # a maintainer's tool, not needed on a device


def copy_runtime(dst: Path) -> None:
    """Every .py file of the package into `dst` (the runtime's `pipeline/` folder), keeping the layout."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() not in EXCLUDE:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)
