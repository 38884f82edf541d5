"""Our checkpoint format: atomic save, safe load (`weights_only=True`), rebuild-and-load with clear errors.

A checkpoint is a dict `{"format": FORMAT, "model": <config dict, incl. arch and scale>, "state_dict": ..., **extra}`.
The config dict rebuilds the exact module structure before the weights load: for the `anchor` family it records
`folded` (false: the training form with ECB branches; true: plain convs), so either form round-trips.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import SRBase
from .registry import build_model

FORMAT = "facd-pipeline-checkpoint/1"
_RESERVED = ("format", "model", "state_dict")


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(path: str | os.PathLike[str], model: SRBase, **extra: Any) -> Path:
    """Write `model` (config + CPU state dict) and `extra` (plain data / tensors) atomically to `path`."""
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra checkpoint keys clash with reserved ones: {', '.join(clash)}")
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "model": model.config, "state_dict": state, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    buffer = io.BytesIO()  # torch.save turns a failed write into a bare RuntimeError; f.write keeps the OSError
    torch.save(payload, buffer)
    try:
        with open(tmp, "xb") as f:  # plain open, so the file gets the usual umask permissions
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_torch_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`, every failure turned into a CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} {p}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{what} {p} is not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's wording varies; the GLOBAL name does not
        if refused:
            raise CheckpointError(
                f"{what} {p} holds a pickled {refused.group(1)}, not only tensors and plain data; refusing to load "
                "it (weights_only=True)"
            ) from None
        raise CheckpointError(f"{what} {p} is not a readable PyTorch file (corrupt?): {_unpickle_reason(e)}") from None
    except Exception as e:  # zip, pickle and EOF errors alike: the file is corrupt, truncated or not PyTorch's
        reason = ": ".join(filter(None, (type(e).__name__, _first_line(e))))
        raise CheckpointError(f"{what} {p} is not a readable PyTorch file (corrupt or truncated?): {reason}") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check one of our checkpoints; any problem -> CheckpointError naming `path`."""
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a facd-pipeline checkpoint (no 'format' entry)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt['format']!r}; this version reads {FORMAT!r}")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} lacks a 'model' config or a 'state_dict'")
    return ckpt


def model_from_checkpoint(
    ckpt_or_path: Mapping[str, Any] | str | os.PathLike[str],
    expect_arch: str | None = None,
    expect_scale: int | None = None,
    name: str = "checkpoint",
) -> SRBase:
    """Rebuild the stored model and load its weights strictly, checking arch / scale against the expectation.

    `name` names an already loaded checkpoint dict in errors.
    """
    if isinstance(ckpt_or_path, Mapping):
        ckpt, src = ckpt_or_path, name
        if ckpt.get("format") != FORMAT or not isinstance(ckpt.get("model"), Mapping):
            raise CheckpointError(f"{src} is not a facd-pipeline checkpoint (format {ckpt.get('format')!r})")
        if not isinstance(ckpt.get("state_dict"), Mapping) or not all(isinstance(k, str) for k in ckpt["state_dict"]):
            raise CheckpointError(f"{src} has no 'state_dict' of parameter names and tensors")
    else:
        ckpt, src = load_checkpoint(ckpt_or_path), f"checkpoint {ckpt_or_path}"
    cfg = ckpt["model"]
    arch, scale = cfg.get("arch"), cfg.get("scale")
    if (expect_arch is not None and arch != expect_arch) or (expect_scale is not None and scale != expect_scale):
        wanted = " ".join(
            s for s in (expect_arch, None if expect_scale is None else f"scale={expect_scale}") if s is not None
        )
        raise CheckpointError(f"{src} is arch={arch} scale={scale}, expected {wanted}")
    try:
        model = build_model(cfg)
    except ValueError as e:
        raise CheckpointError(f"{src} has an invalid model config: {e}") from None
    load_state_strict(model, ckpt["state_dict"], src)
    return model


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], src: str) -> None:
    """`load_state_dict(strict=True)` with a CheckpointError naming missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise CheckpointError(f"{src} does not fit the model: {'; '.join(parts)}")
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{src}: {k} is not a tensor ({type(v).__name__})")
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"{src}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=True)


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _unpickle_reason(e: BaseException) -> str:
    # torch wraps the real reason ("Unsupported operand 16") in a long advice text about weights_only.
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return m.group(1).strip()[:200] if m else _first_line(e) or type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
