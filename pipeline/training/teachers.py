"""Teachers shipped with the package: `data/teachers/teachers.json` lists each checkpoint with its preset, scale and
sha256; a listed file that is missing or whose sha256 differs is refused, naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.rundir import sha256_file

TEACHERS_DIR = Path(__file__).resolve().parents[1] / "data" / "teachers"  # package data of pipeline.data
INDEX = "teachers.json"


def shipped_teachers() -> list[dict[str, Any]]:
    index = TEACHERS_DIR / INDEX
    return json.loads(index.read_text())["teachers"] if index.exists() else []


def shipped_teacher(preset: str, scale: int) -> Path | None:
    """The checked checkpoint of the shipped teacher `preset` at `scale`, or None when none is shipped."""
    for entry in shipped_teachers():
        if entry["preset"] == preset and entry["scale"] == scale:
            path = TEACHERS_DIR / entry["file"]
            if not path.is_file():
                raise UserError(f"the shipped teacher {path} is missing (the installation is incomplete: reinstall "
                                "the package, or pass --teacher CKPT)")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise UserError(f"the shipped teacher {path} is altered: sha256 {digest}, expected "
                                f"{entry['sha256']} (reinstall the package, or pass --teacher CKPT)")
            return path
    return None
