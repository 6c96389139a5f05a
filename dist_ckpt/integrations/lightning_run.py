"""A Lightning ``dirpath`` as a dist_ckpt run: checkpoint names, pointers, retention.

Lightning names checkpoints by file (``<dirpath>/epoch=2-step=300.ckpt``, ``last.ckpt``); a
dist_ckpt run stores steps (``<dirpath>/step_000000300/``) and keeps ``last`` and
``best:<metric>`` as pointers in ``manifest.json``. This module maps one onto the other:

* a checkpoint is stored as the step ``checkpoint["global_step"]``; the Lightning file name it
  was saved under is recorded in its ``COMMITTED`` marker (``{"lightning": {"name": ...}}``),
  written with the commit, so name and step can never disagree;
* ``last.ckpt`` (and ``last-vN.ckpt``) is never a file: it names the manifest's ``last``
  pointer, the newest *committed* step — a save in flight or interrupted is never ``last``.
  A save under a ``last`` name at a step that is saved already writes nothing;
* retention follows Lightning's decisions (``remove_checkpoint``), and additionally drops a
  step written only as ``last`` once a newer step is committed, and an older step whose name
  was reused by a newer one. A step a pointer names is never deleted.

Only the writing process (Lightning's global rank 0) creates a :class:`RunWriter`; it holds
the run's writer lock (``LOCK``) from its first save until ``close()``. Readers (every rank,
on resume) use :func:`resolve_step` and never lock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed.checkpoint as dcp

from dist_ckpt import manifest as mf
from dist_ckpt.api import run_dcp
from dist_ckpt.checkpoint_files import COMMITTED
from dist_ckpt.errors import CheckpointNotFound, ConfigError
from dist_ckpt.format.shard import ChunkCodec
from dist_ckpt.planner import JsonSavePlanner
from dist_ckpt.run_lock import RunLock
from dist_ckpt.run_store import RunStore, entry_from_committed, parse_step_prefix, step_prefix
from dist_ckpt.storage import DistCkptWriter
from dist_ckpt.write_guard import require_conditional_writes
from storage_backends import Backend, join_key

log = logging.getLogger(__name__)

LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")
PROTOCOL = "distckpt"  # ``distckpt://<dirpath>/last.ckpt``: what ModelCheckpoint hands the Trainer for "last"


@dataclass(frozen=True)
class CheckpointPath:
    """A path Lightning hands the plugin: the run root (``dirpath``) and the checkpoint name."""

    root: str
    name: str

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"


def parse_path(path: Any) -> CheckpointPath:
    text = str(path)
    if text.startswith(PROTOCOL + "://"):
        text = text[len(PROTOCOL) + 3 :]
    text = text.rstrip("/")
    if text.startswith("s3://"):
        root, _, name = text.rpartition("/")
        if root.count("/") < 2 or not name:
            raise ConfigError(f"{path!r}: expected s3://bucket/dirpath/<checkpoint name>")
        return CheckpointPath(root, name)
    if "://" in text:
        raise ConfigError(f"{path!r}: DistCkptIO stores checkpoints on local/NFS paths and s3:// URIs")
    text = os.path.abspath(os.path.expanduser(text))
    return CheckpointPath(os.path.dirname(text), os.path.basename(text))


def lightning_records(backend: Backend) -> dict[int, tuple[str | None, tuple[str, ...]]]:
    """step → (the Lightning name it was saved under — None: saved as ``last`` only —, the
    names its save retired), for every committed step of the run that DistCkptIO wrote."""
    out: dict[int, tuple[str | None, tuple[str, ...]]] = {}
    for step, record in RunStore(backend).committed_records():
        info = record.document.get("lightning")
        if isinstance(info, dict):
            name = info.get("name")
            retires = info.get("retires") or []
            out[step] = (name if isinstance(name, str) else None, tuple(r for r in retires if isinstance(r, str)))
    return out


def committed_names(backend: Backend) -> dict[int, str | None]:
    """step → the Lightning name it was saved under (None: saved as ``last`` only)."""
    return {step: name for step, (name, _) in lightning_records(backend).items()}


def last_step(backend: Backend) -> int | None:
    """The newest committed step: the ``last`` pointer as the COMMITTED markers define it
    (also right after a crash between a commit and its manifest update)."""
    entries = RunStore(backend).committed_entries()
    return entries[-1].step if entries else None


def resolve_step(backend: Backend, name: str) -> int:
    """The step a Lightning checkpoint name stands for in the run at ``backend``."""
    if LAST_NAME.match(name):
        step = last_step(backend)
        if step is None:
            raise CheckpointNotFound(f"{backend.uri}/{name}: the run has no committed checkpoint yet")
        return step
    step = parse_step_prefix(name)
    if step is not None:
        if not backend.exists(join_key(name, COMMITTED)):
            raise CheckpointNotFound(f"{backend.uri}/{name}: no committed checkpoint there")
        return step
    names = committed_names(backend)
    matches = [s for s, n in names.items() if n == name]
    if not matches:
        known = sorted({n for n in names.values() if n})
        raise CheckpointNotFound(
            f"{backend.uri}/{name}: no committed checkpoint of this run was saved under that name; "
            f"it has {', '.join(known) if known else 'none'} and 'last.ckpt' (the newest committed step)"
        )
    return max(matches)


class RunWriter:
    """The writing side of one run root (Lightning's global rank 0 only)."""

    def __init__(
        self,
        backend: Backend,
        codec: ChunkCodec | None,
        *,
        lock_stale_after: float = 600.0,
        unsafe_single_writer: bool = False,
    ):
        self.backend, self.codec = backend, codec
        self.store = RunStore(backend)
        require_conditional_writes(
            backend, unsafe_single_writer=unsafe_single_writer, opt_in="DistCkptIO(unsafe_single_writer=True)"
        )  # S3: probed once per bucket
        self.lock = RunLock(backend, lock_stale_after)  # before gc: never touch a live job's saves
        self.lock.acquire()
        found = self.store.collect_garbage()
        if found.temp_dirs or found.uncommitted_steps or found.unfinished_uploads:
            log.warning("removed leftovers of interrupted saves in %s: %s", backend.uri, found)
        manifest = self.store.reconciled_manifest({})
        records = lightning_records(backend)
        self.names = {step: name for step, (name, _) in records.items()}  # step → name, for retention
        # Steps a later committed save retired (Lightning's top-k drop, recorded in that save's
        # COMMITTED): a job killed between that commit and the delete leaves them behind.
        self.retired: set[int] = {
            old
            for step, (_, retires) in records.items()
            for old, name in self.names.items()
            if name in retires and old < step
        }
        self._retain(manifest)

    def has_step(self, step: int) -> bool:
        return step in self.names or self.backend.exists(join_key(step_prefix(step), COMMITTED))

    def commit(
        self,
        step: int,
        name: str | None,
        flat: dict[str, Any],
        *,
        epoch: int | None,
        metrics: Mapping[str, float],
        best_modes: Mapping[str, str],
        retires: tuple[str, ...] = (),
    ) -> None:
        """Write, commit and index one checkpoint, then apply retention. ``retires``: names
        this save replaces (ModelCheckpoint's top-k drop), recorded in its COMMITTED marker so
        that the drop survives a crash between this commit and the delete."""
        self.lock.raise_if_lost()
        info = {
            "step": step,
            "epoch": epoch,
            "metrics": dict(metrics),
            "time": time.time(),
            "codec": self.codec.name if self.codec else "none",
            "lightning": {"name": name, "retires": list(retires)},
        }
        writer = DistCkptWriter(
            self.backend, step_prefix(step), codec=self.codec, commit_info=info, fence=self.lock.fence
        )
        # Lightning calls CheckpointIO on global rank 0 alone (the state is replicated under
        # DDP): a local save, with no collective on the training job's process group.
        run_dcp(dcp.save, flat, storage_writer=writer, planner=JsonSavePlanner(), no_dist=True)
        self.names[step] = name
        self.retired |= {s for s, n in self.names.items() if n in retires and s < step}
        key = join_key(step_prefix(step), COMMITTED)
        entry = entry_from_committed(step, self.backend.read(key), f"{self.backend.uri}/{key}")
        self.lock.fence.check(self.backend, f"updating {self.backend.uri}/manifest.json")
        manifest = self.store.update_manifest(lambda m: mf.with_entry(m or mf.Manifest(), entry, best_modes))
        self._retain(manifest, reused=name, newest=step)

    def remove(self, name: str) -> None:
        """Lightning no longer wants the checkpoint ``name``: delete its step(s) unless a
        pointer names them (then they go once no pointer does)."""
        if LAST_NAME.match(name):
            return  # "last" is a pointer, nothing to delete
        self.retired |= {s for s, n in self.names.items() if n == name}
        manifest, _ = self.store.read_manifest()
        self._retain(manifest or self.store.reconciled_manifest({}))

    def _retain(self, manifest: mf.Manifest, *, reused: str | None = None, newest: int | None = None) -> None:
        pointed = set(manifest.pointers.values())
        drops = sorted(
            s
            for s, n in self.names.items()
            if s not in pointed
            and (n is None or s in self.retired or (reused is not None and n == reused and s != newest))
        )
        if not drops:
            return
        self.lock.fence.check(self.backend, f"updating {self.backend.uri}/manifest.json")
        self.store.update_manifest(lambda m: mf.without_steps(m or replace(manifest), drops))
        for step in drops:  # only now: the manifest that no longer lists them is durable
            self.lock.fence.check(self.backend, f"deleting step {step} (retention)")
            self.store.delete_step(step)
            self.names.pop(step, None)
            self.retired.discard(step)

    def close(self) -> None:
        self.lock.release()
