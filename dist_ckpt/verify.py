"""Verify checkpoints: completeness (every file of the file table present, sizes right) and
checksums (xxh3-128 of each shard's header and of its data region, as recorded while writing).

Used by ``dist-ckpt verify`` and ``dist-ckpt copy`` (which verifies the destination before it
commits). A damaged file is reported as a :class:`Problem` naming it — verification itself
raises only when there is nothing to verify (:class:`CheckpointNotFound`) or the storage fails
(:class:`StorageError`).

``quick=True`` checks sizes and headers only (header checksum and header structure); the full
check streams every file once, in bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

from dist_ckpt import manifest as mf
from dist_ckpt.checkpoint_files import COMMITTED, METADATA, read_checkpoint_metadata, wrap_backend_error
from dist_ckpt.checkpoint_view import locate
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.metadata_json import CheckpointMetadata, FileRecord
from dist_ckpt.format.safetensors_header import header_length, parse_header
from dist_ckpt.references import file_key
from dist_ckpt.run_store import MANIFEST, STEP_PREFIX, RunStore, entry_from_committed, parse_step_prefix
from storage_backends import Backend, BackendError, ObjectNotFound, join_key

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 * 1024 * 1024


class ProgressSink(Protocol):
    """What verification reports its progress to (the CLI adapts a tqdm bar)."""

    def add_total(self, n: int) -> None: ...

    def update(self, n: int) -> None: ...


class _NoProgress:
    def add_total(self, n: int) -> None:
        pass

    def update(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class Problem:
    """One thing wrong: ``file`` is the object's name inside the checkpoint (or run root)."""

    file: str
    kind: str  # missing | size | header | header-checksum | data-checksum | entry | metadata | committed | manifest
    message: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "kind": self.kind, "message": self.message}


@dataclass
class CheckpointReport:
    uri: str
    step: int | None
    files: int = 0
    bytes: int = 0
    quick: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "step": self.step,
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "quick": self.quick,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass
class RunReport:
    uri: str
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # run level: the manifest
    notes: list[str] = field(default_factory=list)  # leftovers `gc` would remove: not failures

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checkpoints)

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "ok": self.ok,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "problems": [p.to_json() for p in self.problems],
            "notes": list(self.notes),
        }


def parse_checksum(text: str) -> tuple[str, str] | None:
    """``(header hex, data hex)`` of a file checksum ``xxh3_128:<header>:<data>``."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "xxh3_128" or not all(len(p) == 32 for p in parts[1:]):
        return None
    return parts[1], parts[2]


def verify_file(
    backend: Backend, key: str, record: FileRecord, *, quick: bool = False, progress: ProgressSink | None = None
) -> Problem | None:
    """Check one shard file against its file-table record; the first thing wrong, or None."""
    sink = progress or _NoProgress()
    name = key.rsplit("/", 1)[-1]
    where = f"{backend.uri}/{key}"
    try:
        size = backend.size(key)
    except ObjectNotFound:
        return Problem(
            name, "missing", f"{where}: missing (metadata.json lists it: rank {record.rank}, {record.size} bytes)"
        )
    if size != record.size:
        what = "truncated" if size < record.size else "longer than recorded"
        return Problem(name, "size", f"{where}: {size} bytes, metadata.json records {record.size} ({what})")
    sums = parse_checksum(record.checksum)
    if sums is None:
        return Problem(name, "metadata", f"{where}: metadata.json holds an unknown checksum {record.checksum!r}")
    try:
        hlen = header_length(backend.read(key, 0, min(8, size)), where, size)
        header = backend.read(key, 0, hlen)
        if xxhash.xxh3_128_hexdigest(header) != sums[0]:
            what = f"{where}: header checksum mismatch (the file's first {hlen} bytes are damaged)"
            return Problem(name, "header-checksum", what)
        parse_header(header, where, size)
    except CorruptCheckpoint as e:
        return Problem(name, "header", str(e))
    if quick:
        return None
    data_hash, pos = xxhash.xxh3_128(), hlen
    sink.update(hlen)
    while pos < size:
        block = backend.read(key, pos, min(BLOCK_BYTES, size - pos))
        if not block:
            return Problem(name, "size", f"{where}: short read at byte {pos} of {size} (truncated while reading)")
        data_hash.update(block)
        pos += len(block)
        sink.update(len(block))
    if data_hash.hexdigest() != sums[1]:
        return Problem(
            name, "data-checksum", f"{where}: data checksum mismatch (bytes after the {hlen}-byte header are damaged)"
        )
    return None


def verify_files(
    backend: Backend,
    prefix: str,
    files: Mapping[str, FileRecord],
    *,
    quick: bool = False,
    progress: ProgressSink | None = None,
) -> list[Problem]:
    """Verify every file of a file table below ``prefix``."""
    problems = []
    for name, record in sorted(files.items()):
        try:
            # an incremental checkpoint's referenced files (earlier steps') are checked too
            problem = verify_file(backend, file_key(prefix, name), record, quick=quick, progress=progress)
        except BackendError as e:
            raise wrap_backend_error(e, f"{backend.uri}/{prefix}/{name}") from e
        if problem is not None:
            log.info("%s", problem.message)
            problems.append(problem)
    return problems


def _planned_bytes(files: Mapping[str, FileRecord], quick: bool) -> int:
    return 0 if quick else sum(r.size for r in files.values())


def _load_meta(
    backend: Backend, prefix: str, report: CheckpointReport
) -> tuple[CheckpointMetadata | None, mf.Entry | None]:
    """metadata.json and the COMMITTED marker's entry; None for what is damaged, with a problem
    recorded. :class:`CheckpointNotFound` when the checkpoint is not committed."""
    entry = None
    try:
        committed = backend.read(join_key(prefix, COMMITTED))
    except ObjectNotFound:
        committed = None
    except BackendError as e:
        raise wrap_backend_error(e, report.uri) from e
    if committed is not None:
        try:
            entry = entry_from_committed(report.step or 0, committed, f"{report.uri}/{COMMITTED}")
        except CorruptCheckpoint as e:
            report.problems.append(Problem(COMMITTED, "committed", str(e)))
    try:
        return read_checkpoint_metadata(backend, prefix), entry
    except CorruptCheckpoint as e:
        report.problems.append(Problem(METADATA, "metadata", str(e)))
        return None, entry


def verify_checkpoint(
    backend: Backend, prefix: str, *, quick: bool = False, progress: ProgressSink | None = None
) -> CheckpointReport:
    """Verify the committed checkpoint at ``prefix`` of ``backend``."""
    sink = progress or _NoProgress()
    report = CheckpointReport(f"{backend.uri}/{prefix}", parse_step_prefix(prefix.rsplit("/", 1)[-1]), quick=quick)
    meta, _ = _load_meta(backend, prefix, report)
    if meta is not None:
        sink.add_total(_planned_bytes(meta.files, quick))
        report.files, report.bytes = len(meta.files), sum(r.size for r in meta.files.values())
        report.problems += verify_files(backend, prefix, meta.files, quick=quick, progress=sink)
    return report


def _committed_folders(backend: Backend) -> list[str]:
    try:
        objects = backend.list(STEP_PREFIX)
    except BackendError as e:
        raise wrap_backend_error(e, backend.uri) from e
    return sorted(
        o.key.split("/", 1)[0]
        for o in objects
        if o.key.count("/") == 1
        and o.key.endswith("/" + COMMITTED)
        and parse_step_prefix(o.key.split("/", 1)[0]) is not None
    )


def verify_run(backend: Backend, *, quick: bool = False, progress: ProgressSink | None = None) -> RunReport:
    """Verify every committed checkpoint of the run at ``backend`` and the manifest's
    consistency with the ``COMMITTED`` markers. Leftovers of interrupted saves are noted."""
    sink = progress or _NoProgress()
    report = RunReport(backend.uri)
    folders = _committed_folders(backend)
    entries: list[mf.Entry] = []
    metas: list[tuple[str, CheckpointReport, CheckpointMetadata | None]] = []
    for folder in folders:
        ckpt = CheckpointReport(f"{backend.uri}/{folder}", parse_step_prefix(folder), quick=quick)
        meta, entry = _load_meta(backend, folder, ckpt)
        if entry is not None:
            entries.append(entry)
        if meta is not None:
            sink.add_total(_planned_bytes(meta.files, quick))
        metas.append((folder, ckpt, meta))
    for folder, ckpt, meta in metas:
        if meta is not None:
            ckpt.files, ckpt.bytes = len(meta.files), sum(r.size for r in meta.files.values())
            ckpt.problems += verify_files(backend, folder, meta.files, quick=quick, progress=sink)
        report.checkpoints.append(ckpt)
    store = RunStore(backend)
    report.problems += manifest_problems(store, entries, [parse_step_prefix(f) for f in folders])
    leftovers = store.leftovers()
    for folder in leftovers.temp_dirs + leftovers.uncommitted_steps:
        report.notes.append(
            f"{backend.uri}/{folder}: leftover of an interrupted save (not a checkpoint; `dist-ckpt gc` removes it)"
        )
    for key in leftovers.unfinished_uploads:
        report.notes.append(f"{backend.uri}/{key}: unfinished upload (`dist-ckpt gc` removes it)")
    return report


def manifest_problems(store: RunStore, entries: list[mf.Entry], committed_steps: list[Any]) -> list[Problem]:
    """Where ``manifest.json`` disagrees with the COMMITTED markers (``entries``)."""
    where = f"{store.uri}/{MANIFEST}"

    def problem(message: str) -> Problem:
        return Problem(MANIFEST, "manifest", message)

    manifest, version = store.read_manifest()
    if manifest is None:
        if version is not None:
            return [
                problem(
                    f"{where}: not a valid run manifest (the manager rebuilds it from the COMMITTED markers "
                    "at its next start)"
                )
            ]
        if committed_steps:
            return [problem(f"{where}: missing although {len(committed_steps)} checkpoints are committed")]
        return []
    problems = []
    listed, committed = set(manifest.steps()), set(committed_steps)
    if listed - committed:
        problems.append(problem(f"{where}: lists steps {sorted(listed - committed)} that have no committed checkpoint"))
    if committed - listed:
        problems.append(
            problem(
                f"{where}: does not list committed steps {sorted(committed - listed)} (stale: a crash "
                "between commit and manifest update)"
            )
        )
    for entry in entries:
        stored = manifest.entry(entry.step)
        if stored is not None and mf.dumps(mf.Manifest((stored,))) != mf.dumps(mf.Manifest((entry,))):
            problems.append(problem(f"{where}: entry of step {entry.step} differs from its COMMITTED marker"))
    expected = mf.compute_pointers(entries, manifest.best_modes)
    if not listed - committed and dict(manifest.pointers) != expected:
        problems.append(
            problem(
                f"{where}: pointers {dict(manifest.pointers)} differ from those the COMMITTED markers give: {expected}"
            )
        )
    return problems


def verify(uri: str, *, quick: bool = False, progress: ProgressSink | None = None) -> CheckpointReport | RunReport:
    """Verify a checkpoint or a whole run, whichever ``uri`` names."""
    kind, backend, prefix = locate(uri)
    if kind == "checkpoint":
        return verify_checkpoint(backend, prefix, quick=quick, progress=progress)
    return verify_run(backend, quick=quick, progress=progress)
