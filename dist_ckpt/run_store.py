"""A run root on a backend: its committed steps, its manifest, its leftovers.

Shared by the manager and the CLI. The truth is the set of ``step_*/COMMITTED`` markers; the
manifest is read, rebuilt when missing, corrupt or stale, and updated with compare-and-swap.
Deletion happens only after the manifest that no longer lists a step is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_ckpt import manifest as mf
from dist_ckpt import sweep
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.errors import CheckpointError, CorruptCheckpoint, StorageError

# the layout's names, re-exported for the modules that import them from here
from dist_ckpt.layout import (  # noqa: F401
    COMMITTED,
    MANIFEST,
    STEP_PREFIX,
    STEP_RE,
    TMP_RE,
    parse_step_prefix,
    step_prefix,
)
from storage_backends import Backend, BackendError, ObjectNotFound, PreconditionFailed

if TYPE_CHECKING:
    from dist_ckpt.lock_fence import Fence

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 20
_READ_ONLY_CODES = frozenset({"EROFS", "EACCES", "EPERM", "AccessDenied"})


def entry_from_committed(step: int, data: bytes, where: str) -> mf.Entry:
    """The manifest entry of ``step`` from its ``COMMITTED`` marker's bytes (``where``: its URI)."""
    return CommitRecord.from_json(data, where).entry(step)


@dataclass(frozen=True)
class Retention:
    """What :meth:`RunStore.apply_retention` made durable, and the steps it dropped from it."""

    manifest: mf.Manifest
    drops: tuple[int, ...]
    failed: tuple[int, ...] = ()  # dropped steps that could not be deleted (left to gc)

    @property
    def last_step(self) -> int | None:
        """The run's newest committed step: the durable manifest's ``last`` pointer."""
        return self.manifest.pointers.get(mf.LAST)


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

    def committed_records(self) -> list[tuple[int, CommitRecord]]:
        """(step, its parsed ``COMMITTED`` marker) for every committed checkpoint, by step.

        A marker listed and then gone when read was deleted meanwhile (retention run by the job
        that writes this run, while a monitor, a CLI or another rank lists it): that step is no
        longer committed and is left out rather than failing the whole listing."""
        try:
            markers = [o.key for o in self.backend.list(STEP_PREFIX) if o.key.endswith("/" + COMMITTED)]
            records = []
            for key in markers:
                step = parse_step_prefix(key.split("/", 1)[0])
                if step is None or key.count("/") != 1:
                    continue
                try:
                    data = self.backend.read(key)
                except ObjectNotFound:
                    log.debug("%s/%s was deleted while the run was listed; step %d left out", self.uri, key, step)
                    continue
                records.append((step, CommitRecord.from_json(data, f"{self.uri}/{key}")))
        except BackendError as e:
            raise self._wrap(e) from e
        return sorted(records, key=lambda r: r[0])

    def committed_entries(self) -> list[mf.Entry]:
        """Every committed checkpoint's manifest entry, from its COMMITTED marker, by step."""
        return [record.entry(step) for step, record in self.committed_records()]

    def leftovers(self) -> Leftovers:
        try:
            objects = self.backend.list(STEP_PREFIX)
            uploads = tuple(self.backend.abandoned_uploads(STEP_PREFIX))
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
            self.backend.abort_uploads(STEP_PREFIX)
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

    def apply_retention(
        self,
        change: Callable[[mf.Manifest | None], mf.Manifest],
        keep_last: int | None,
        keep_every_n_steps: int | None = None,
        *,
        fence: Fence | None = None,
        deletes_later: bool = False,
        on_failure: Callable[[int, CheckpointError], None] | None = None,
    ) -> Retention:
        """Update the manifest with ``change``, less the steps retention drops from the result
        (:func:`dist_ckpt.manifest.retention_drops`), with compare-and-swap — then delete those
        steps, only now that the manifest which no longer lists them is durable (a reader never
        follows the manifest to a deleted step; a crash in between leaves steps gc removes).
        ``fence``: the run lock, renewed before the manifest update and before each delete (a
        job that lost it raises :class:`RunLocked` and changes nothing more). ``deletes_later``:
        the caller runs :meth:`delete_dropped` itself (the async worker, after the save's
        verdict). ``on_failure``: see :meth:`delete_dropped`."""
        drops: tuple[int, ...] = ()

        def retained(current: mf.Manifest | None) -> mf.Manifest:
            nonlocal drops
            new = change(current)
            drops = tuple(mf.retention_drops(new, keep_last, keep_every_n_steps))
            return mf.without_steps(new, drops)

        if fence is not None:
            fence.check(self.backend, f"updating {self.uri}/{MANIFEST}")
        manifest = self.update_manifest(retained)  # raises before any delete when the write fails
        if deletes_later:
            return Retention(manifest, drops)
        return Retention(manifest, drops, tuple(self.delete_dropped(drops, fence=fence, on_failure=on_failure)))

    def delete_dropped(
        self,
        drops: tuple[int, ...],
        *,
        fence: Fence | None = None,
        on_failure: Callable[[int, CheckpointError], None] | None = None,
    ) -> list[int]:
        """Delete the steps retention dropped (call only once the manifest without them is
        durable). A step that cannot be deleted is reported to ``on_failure`` (default: logged)
        and left to gc; the others are still deleted. Returns the steps not deleted."""
        failed = []
        for step in drops:
            try:
                if fence is not None:
                    fence.check(self.backend, f"deleting step {step} (retention)")
                self.delete_step(step)
            except (StorageError, CorruptCheckpoint) as e:  # corrupt: what the run's checkpoints reference is unknown
                failed.append(step)
                if on_failure is not None:
                    on_failure(step, e)
                else:
                    log.exception("retention could not delete step %d of %s; `dist-ckpt gc` will", step, self.uri)
        return failed
