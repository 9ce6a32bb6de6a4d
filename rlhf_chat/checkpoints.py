"""Checkpoints: adapter and head weights on disk, one versioned folder each.

A folder is written under a temporary name and renamed into place, so a crash
or a full disk mid-save leaves the previous checkpoint as it was, never half
of a new one. The database names each finished folder (``store.add_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
META = "meta.json"


def checkpoint_path(root: str | Path, kind: str, version: int) -> Path:
    """Where version ``version`` of ``kind`` (reward | policy) lives."""
    return Path(root) / f"{kind}-v{version:05d}"


def save_checkpoint(root: str | Path, kind: str, version: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors and metadata atomically; returns the final folder."""
    target = checkpoint_path(root, kind, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if target.exists():  # a retried save of the same version replaces it whole
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a saved checkpoint."""
    path = Path(path)
    return load_file(str(path / WEIGHTS)), json.loads((path / META).read_text())


def module_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict with its keys under ``prefix``."""
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into live parameters of the same names (in place: the
    optimizer and the other copy keep pointing at the same tensors)."""
    missing = params.keys() - tensors.keys()
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
