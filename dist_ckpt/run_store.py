"""A run root on a backend: its committed steps, its manifest, its leftovers.

Shared by the manager and the CLI. The truth is the set of ``step_*/COMMITTED`` markers; the
manifest is read, rebuilt when missing, corrupt or stale, and updated with compare-and-swap.
Deletion happens only after the manifest that no longer lists a step is durable.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dist_ckpt import manifest as mf
from dist_ckpt import sweep
from dist_ckpt.checkpoint_files import COMMITTED
from dist_ckpt.errors import ConfigError, CorruptCheckpoint, StorageError
from storage_backends import Backend, BackendError, PreconditionFailed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d{9,})$")
TMP_RE = re.compile(r"^step_\d+\.tmp-[0-9a-f]+$")
_CAS_ATTEMPTS = 20
_READ_ONLY_CODES = frozenset({"EROFS", "EACCES", "EPERM", "AccessDenied"})


def step_prefix(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        # ConfigError (a ValueError): inside the manager's rank-0 decisions it reaches every rank
        raise ConfigError(f"step must be a non-negative int, got {step!r}")
    return f"step_{step:09d}"


def parse_step_prefix(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def entry_from_committed(step: int, data: bytes, where: str) -> mf.Entry:
    try:
        info = json.loads(data.decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return mf.Entry(
            step=step,
            epoch=info.get("epoch"),
            metrics={str(k): float(v) for k, v in (info.get("metrics") or {}).items()},
            time=float(info.get("time") or 0.0),
            size=int(info.get("bytes") or 0),
            world_size=int(info.get("world_size") or 1),
            codec=str(info.get("codec") or "none"),
            logical_size=int(info.get("logical_bytes") or 0),  # incremental: own + referenced
        )
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise CorruptCheckpoint(f"{where}: COMMITTED marker is not valid JSON ({e})") from e


@dataclass(frozen=True)
class Leftovers:
    """What a crash can leave behind; invisible to readers, removed by :func:`collect_garbage`."""

    temp_dirs: tuple[str, ...]
    uncommitted_steps: tuple[str, ...]
    unfinished_uploads: tuple[str, ...]


class RunStore:
    """The run root at ``backend``."""

    def __init__(self, backend: Backend):
        self.backend = backend
        # Set when a manifest write failed: a step may be committed that the manifest does not
        # list, and updates applied to that manifest would keep it stale (until a restart).
        self._reconcile_first = False

    @property
    def uri(self) -> str:
        return self.backend.uri

    def _wrap(self, e: BackendError) -> StorageError:
        return StorageError(f"storage failed for run {self.uri}: {e}")

    def committed_entries(self) -> list[mf.Entry]:
        """Every committed checkpoint, from its COMMITTED marker."""
        try:
            markers = [o.key for o in self.backend.list("step_") if o.key.endswith("/" + COMMITTED)]
            entries = []
            for key in markers:
                step = parse_step_prefix(key.split("/", 1)[0])
                if step is None or key.count("/") != 1:
                    continue
                entries.append(entry_from_committed(step, self.backend.read(key), f"{self.uri}/{key}"))
        except BackendError as e:
            raise self._wrap(e) from e
        return sorted(entries, key=lambda e: e.step)

    def leftovers(self) -> Leftovers:
        try:
            objects = self.backend.list("step_")
            uploads = tuple(self.backend.abandoned_uploads("step_"))
        except BackendError as e:
            raise self._wrap(e) from e
        folders: dict[str, set[str]] = {}
        for o in objects:
            top, _, rest = o.key.partition("/")
            folders.setdefault(top, set()).add(rest)
        temp = tuple(sorted(f for f in folders if TMP_RE.match(f)))
        uncommitted = sorted(f for f, names in folders.items() if STEP_RE.match(f) and COMMITTED not in names)
        try:  # a deleted step's files that later incremental checkpoints still read are no leftovers
            uncommitted = sweep.unmarked_folders(self.backend, uncommitted)
        except BackendError as e:
            raise self._wrap(e) from e
        except CorruptCheckpoint as e:  # which files are referenced is unknown: all listed, none swept
            log.warning("%s", e)
        return Leftovers(temp, tuple(uncommitted), uploads)

    def collect_garbage(self, dry_run: bool = False) -> Leftovers:
        found = self.leftovers()
        if dry_run:
            return found
        try:
            for folder in found.temp_dirs:
                log.info("gc: removing %s/%s", self.uri, folder)
                self.backend.delete_prefix(folder + "/")
            try:
                marked = sweep.marks(self.backend) if found.uncommitted_steps else set()
            except CorruptCheckpoint as e:  # never delete what a checkpoint might reference
                log.warning("gc: not removing %s: %s", ", ".join(found.uncommitted_steps), e)
                found = Leftovers(found.temp_dirs, (), found.unfinished_uploads)
            for folder in found.uncommitted_steps:  # keeps files committed checkpoints refer to
                log.info("gc: removing %s/%s", self.uri, folder)
                sweep.sweep_folder(self.backend, folder, marked)
            self.backend.abort_uploads("step_")
        except BackendError as e:
            raise self._wrap(e) from e
        return found

    def read_manifest(self) -> tuple[mf.Manifest | None, str | None]:
        """The stored manifest and its version; ``(None, version)`` when it is corrupt,
        ``(None, None)`` when absent."""
        try:
            current = self.backend.read_versioned(MANIFEST)
        except BackendError as e:
            raise self._wrap(e) from e
        if current is None:
            return None, None
        try:
            return mf.loads(current.data, f"{self.uri}/{MANIFEST}"), current.version
        except CorruptCheckpoint as e:
            log.warning("%s", e)
            return None, current.version

    def reconciled_manifest(self, best_modes: Mapping[str, str], *, write: bool = True) -> mf.Manifest:
        """The manifest as the COMMITTED markers say it must be, written back if it differed
        (missing, corrupt, stale: a crash between COMMITTED and the manifest update) —
        unless ``write`` is False (readers that must not change the run)."""
        entries = self.committed_entries()

        def fix(current: mf.Manifest | None) -> mf.Manifest:
            base = current or mf.Manifest()
            modes = {**base.best_modes, **best_modes}
            return mf.rebuild(entries, modes, base.tracker_run_id, base.config_hash)

        if not write:
            return fix(self.read_manifest()[0])

        try:
            return self.update_manifest(fix, only_if_changed=True)
        except StorageError as e:
            code = getattr(e.__cause__, "code", None)
            if code not in _READ_ONLY_CODES:
                raise
            # A reader on read-only storage (a read-only mount, read-only credentials): the
            # manifest is only an index, so use the rebuilt one without writing it.
            log.warning("%s: cannot write the reconciled manifest (%s); using it in memory", self.uri, code)
            return fix(self.read_manifest()[0])

    def update_manifest(
        self, change: Callable[[mf.Manifest | None], mf.Manifest], *, only_if_changed: bool = False
    ) -> mf.Manifest:
        """Apply ``change`` with compare-and-swap, re-reading and retrying when another writer
        got there first. Returns the manifest that is now durable. After a failed write, the
        manifest is first reconciled with the COMMITTED markers."""
        if self._reconcile_first:
            self._reconcile_first = False
            self.reconciled_manifest({})  # the stored manifest's best modes are kept
        for _ in range(_CAS_ATTEMPTS):
            current, version = self.read_manifest()
            new = change(current)
            if only_if_changed and current is not None and mf.dumps(new) == mf.dumps(current):
                return new
            try:
                self.backend.compare_and_swap(MANIFEST, mf.dumps(new), version)
                return new
            except PreconditionFailed:
                log.info("manifest of %s changed concurrently; retrying", self.uri)
                continue
            except BackendError as e:
                self._reconcile_first = True
                raise self._wrap(e) from e
        raise StorageError(f"{self.uri}/{MANIFEST}: gave up after {_CAS_ATTEMPTS} concurrent updates")

    def delete_step(self, step: int) -> None:
        """Delete a checkpoint: its COMMITTED marker first, so a half-deleted step is never
        mistaken for a committed one; then only the files no committed checkpoint refers to
        (:mod:`dist_ckpt.sweep`)."""
        prefix = step_prefix(step)
        try:
            sweep.delete_checkpoint(self.backend, prefix)
        except BackendError as e:
            raise self._wrap(e) from e
