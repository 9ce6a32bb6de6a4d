"""Checkpoints: adapter and head weights on disk, one versioned folder each.

A folder is written under a temporary name and renamed into place, so a crash
or a full disk mid-save leaves the previous checkpoint as it was, never half
of a new one. The database names each finished folder (``store.add_checkpoint``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from rlhf_chat.storage import store

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
META = "meta.json"


def checkpoint_path(root: str | Path, kind: str, version: int) -> Path:
    """Where version ``version`` of ``kind`` (reward | policy) lives."""
    return Path(root) / f"{kind}-v{version:05d}"


def save_checkpoint(root: str | Path, kind: str, version: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors and metadata atomically; returns the final folder.

    On any error (a full disk, an I/O error) the temporary folder is removed,
    the error propagates, and whatever was in place before is untouched.
    """
    target = checkpoint_path(root, kind, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    old = tmp.with_name(tmp.name + "-old")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        _fsync_file(tmp / WEIGHTS)
        with open(tmp / META, "w") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        # A retried save of the same version replaces it whole: the old folder is
        # moved aside, not deleted, until the new one is in place.
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old.exists() and not target.exists():
                os.replace(old, target)
            raise
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if target.exists():  # never delete the only copy of the old version
            shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_file(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place.

    Without this a crash after the rename can leave a complete-looking folder
    with an empty file; and on network or FUSE volumes (a Space's storage
    bucket) a full disk may only be reported here, not by the write itself.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some systems cannot sync a folder)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_stale_temporaries(target: Path, older_than_s: float = 3600.0) -> None:
    """Delete temporary folders of ``target`` left by a process killed mid-save.

    Only old ones: a young one may belong to a save still running elsewhere
    (two processes sharing one volume).
    """
    now = time.time()
    for stale in target.parent.glob(f".{target.name}-*"):
        try:
            if stale.is_dir() and now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a saved checkpoint.

    A missing folder raises OSError; a truncated or corrupt one (a half-copied
    volume) raises ValueError, not safetensors' own error type, so that callers
    such as ``runtime.restore_latest`` can fall back to an older checkpoint.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise ValueError(f"unreadable checkpoint weights in {path}: {exc}") from exc
    return tensors, json.loads((path / META).read_text())


def _digest(parts: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in parts:
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def files_digest(path: str | Path) -> str:
    """SHA-256 over a checkpoint's files (weights, then metadata): recorded when it is
    published, so that a replica reading it from a shared volume knows it is whole."""
    return _digest([(name, (Path(path) / name).read_bytes()) for name in (WEIGHTS, META)])


def verify_digest(path: str | Path, expected: str | None) -> None:
    """Refuse (ValueError; OSError when a file is missing) a checkpoint whose files are
    not what was published; one published before checksums were recorded passes."""
    if expected is None:
        return
    actual = files_digest(path)
    if actual != expected:
        raise ValueError(_mismatch(path, actual, expected))


def _mismatch(path, actual: str, expected: str) -> str:
    return (f"checkpoint {path} does not match its published checksum (sha256 {actual[:12]}..., "
            f"published {expected[:12]}...): partial, corrupt or overwritten")


def load_verified(path: str | Path, expected: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`load_checkpoint`, from the very bytes that were checked against the
    published checksum: a file that is missing (OSError), partial, corrupt or
    replaced since it was published (ValueError) is refused, never half-loaded.
    Checkpoints published before checksums were recorded (``expected`` None)
    load as they are."""
    if expected is None:
        return load_checkpoint(path)
    path = Path(path)
    weights, meta = (path / WEIGHTS).read_bytes(), (path / META).read_bytes()
    actual = _digest([(WEIGHTS, weights), (META, meta)])
    if actual != expected:
        raise ValueError(_mismatch(path, actual, expected))
    try:
        return load_safetensors(weights), json.loads(meta)
    except SafetensorError as exc:
        raise ValueError(f"unreadable checkpoint weights in {path}: {exc}") from exc


def check_base(meta: dict, base: dict, path: str | Path) -> None:
    """Refuse a checkpoint trained on another base (model or weight path).

    An adapter learned on NF4 weights, applied to the shipped weights in bf16
    (or to another model), computes something nobody trained; it must never
    load silently. Raises ValueError, which ``runtime.restore_latest`` logs
    before it falls back to an older checkpoint or to none.
    """
    saved = meta.get("base")
    if saved == base:
        return
    running = f"model {base.get('model')!r} with {base.get('weights')} weights"
    if not saved:
        raise ValueError(
            f"checkpoint {path} does not name the base it was trained on (made by an older version); "
            f"this process runs {running}, so it is not loaded: start a fresh checkpoint folder"
        )
    raise ValueError(
        f"checkpoint {path} was trained on model {saved.get('model')!r} with {saved.get('weights')} weights; "
        f"this process runs {running}, so it is not loaded (run with that model and --weights {saved.get('weights')}, "
        "or start a fresh checkpoint folder)"
    )


def module_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict with its keys under ``prefix``."""
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into live parameters of the same names (in place: the
    optimizer and the other copy keep pointing at the same tensors)."""
    missing = params.keys() - tensors.keys()
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for name, param in params.items():
        if tensors[name].shape != param.shape:  # e.g. a head saved before it read the answer mean
            saved, live = tuple(tensors[name].shape), tuple(param.shape)
            raise ValueError(f"checkpoint's {name} has shape {saved}, the model's {live}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


def publish_checkpoint(
    sessions, root: str | Path, kind: str, version: int, tensors: dict[str, torch.Tensor], meta: dict,
    also: Callable[[object], None] | None = None,
) -> Path:
    """Save a checkpoint (atomically, :func:`save_checkpoint`), then name it in the
    database with its digest, and run ``also(session)`` in the same transaction (a
    reward round's row, an admin's event); retried while the database is busy.

    In that order, so a row never names a folder that is not whole: a reader (a
    restart, a replica) that finds the row finds the files it names.
    """
    path = save_checkpoint(root, kind, version, tensors, meta)
    digest = files_digest(path)

    def record() -> None:
        with sessions() as session, session.begin():
            store.add_checkpoint(session, kind, version, str(path), {**meta, "sha256": digest})
            if also is not None:
                also(session)

    store.with_retry(record)
    return path


def restore_latest(models, sessions, kind: str, load: Callable[[object, str], int]) -> int:
    """Load the newest checkpoint of a kind that is still on disk and whole; 0 when
    there is none.

    An older one is tried when the newest is unreadable, or does not match the
    checksum it was published with (a wiped disk, a half-copied volume), so a
    restart never serves less than it can.
    """
    with sessions() as session:
        saved = list(reversed(store.checkpoints(session, kind)))
    for checkpoint in saved:
        try:
            verify_digest(checkpoint.path, checkpoint.extra.get("sha256"))  # read twice at start-up: cheap
            version = load(models, checkpoint.path)
            log.info("restored %s checkpoint v%d from %s", kind, version, checkpoint.path)
            return version
        except (OSError, KeyError, ValueError) as exc:
            log.warning("cannot load %s checkpoint %s: %s", kind, checkpoint.path, exc)
    return 0


def prune_checkpoints(sessions, kind: str, keep: int, protect: set[int] = frozenset()) -> list[int]:
    """Remove all but the newest ``keep`` checkpoints of ``kind``, and any version in
    ``protect``; returns the versions removed (none when ``keep`` is 0).

    The newest ones are what a restart and every replica load (they follow the
    newest published version), so neither ever asks for a removed one. Each goes
    row first, then folder: a reader never finds a row naming a folder that is
    going, and the folder is renamed aside before it is deleted, so nothing ever
    sees half of one. A folder that cannot be deleted is left for the next prune.
    """
    if keep <= 0:
        return []
    with sessions() as session:
        saved = store.checkpoints(session, kind)
    newest = {c.version for c in saved[-keep:]}
    doomed = [c for c in saved if c.version not in newest and c.version not in protect]
    for checkpoint in doomed:
        store.write(sessions, lambda s, c=checkpoint: store.remove_checkpoint(s, c.id))
        _remove_folder(Path(checkpoint.path))
    if doomed:
        log.info("pruned %s checkpoints %s", kind, [c.version for c in doomed])
    return [c.version for c in doomed]


def _remove_folder(path: Path) -> None:
    """Rename a checkpoint folder aside, then delete it; a failure is logged, not raised."""
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}-pruned")
    try:
        os.replace(path, aside)
        shutil.rmtree(aside)
    except OSError as exc:
        log.warning("could not remove checkpoint folder %s: %s", path, exc)
