"""``dist-ckpt copy SRC DST``: a checkpoint or a whole run, from any backend to any backend.

Each checkpoint is committed at the destination with the library's own protocol: shard files
streamed into the destination's staging prefix (checked against their recorded checksums while
streaming, then read back and verified), ``metadata.json`` and ``COMMITTED`` with
create-if-absent, then publish. A committed destination step is never overwritten. The
destination's manifest is then rebuilt from its COMMITTED markers (compare-and-swap).
"""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass
from typing import Any

import xxhash

from dist_ckpt import manifest as mf
from dist_ckpt.checkpoint_files import read_checkpoint_metadata, wrap_backend_error
from dist_ckpt.checkpoint_view import locate
from dist_ckpt.cli.common import BREAK_LOCK_HELP, BarSink, human_size, print_json, progress_bar, run_locked
from dist_ckpt.cli.copy_refs import copy_referenced_files, copy_self_contained
from dist_ckpt.cli.write_safety import add_flag, require_safe_writes
from dist_ckpt.commit import commit_checkpoint
from dist_ckpt.errors import ConfigError, CorruptCheckpoint, StepAlreadyExists
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.format.safetensors_header import header_length
from dist_ckpt.layout import COMMITTED, MANIFEST, METADATA, STEP_RE, parse_step_prefix, step_prefix
from dist_ckpt.lock_fence import Fence
from dist_ckpt.references import is_reference
from dist_ckpt.run_store import RunStore
from dist_ckpt.verify import BLOCK_BYTES, parse_checksum, verify_files
from storage_backends import Backend, BackendError, join_key, open_backend

EPILOG = """\
SRC is a checkpoint folder or a run root. For a checkpoint, DST is the run root it is copied
into (it keeps its folder name), or the destination checkpoint folder itself when DST's last
component is a step folder name (step_000001000) or SRC's folder name. For a run, DST is the
destination run root and every committed checkpoint is copied. Refuses (exit 6) when a
destination step is already committed, or while a live job holds the destination run's writer
lock (naming it and its last heartbeat; --break-lock overrides that, dangerously).

examples:
  dist-ckpt copy /data/runs/exp1/step_000001000 s3://bucket/runs/exp1
  dist-ckpt copy /data/runs/exp1 s3://bucket/runs/exp1
  dist-ckpt copy s3://bucket/runs/exp1/step_000001000 /scratch/exp1
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "copy",
        parents=[common],
        help="copy a checkpoint or a run between backends",
        description="Copy a checkpoint (or every committed checkpoint of a run) to another "
        "location, local or S3, verifying checksums and committing with the same protocol.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint folder or run root: a path or s3:// URI")
    p.add_argument("dst", metavar="DST", help="destination run root (or checkpoint folder): a path or s3:// URI")
    p.add_argument("--json", action="store_true", help="print what was copied as JSON")
    add_flag(p)
    p.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    p.add_argument(
        "--keep-references",
        action="store_true",
        help="incremental checkpoints: also copy the earlier checkpoints' files they refer to, to the same "
        "paths, keeping the dedup at the destination (default: each copy is self-contained)",
    )
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Copied:
    source: str
    destination: str
    files: int
    bytes: int


def _open(uri: str) -> Backend:
    try:
        return open_backend(uri)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _copy_object(src: Backend, src_key: str, dst: Backend, dst_key: str, record: FileRecord, sink: BarSink) -> None:
    """Stream one shard file, checking size and both checksums on the way."""
    where = f"{src.uri}/{src_key}"
    sums = parse_checksum(record.checksum)
    if sums is None:
        raise CorruptCheckpoint(f"{where}: metadata.json holds an unknown checksum {record.checksum!r}")
    size = src.size(src_key)
    if size != record.size:
        raise CorruptCheckpoint(
            f"{where}: {size} bytes, metadata.json records {record.size}; not copied (`dist-ckpt verify` the source)"
        )
    hlen = header_length(src.read(src_key, 0, min(8, size)), where, size)
    head_hash, data_hash = xxhash.xxh3_128(), xxhash.xxh3_128()
    writer = dst.open_writer(dst_key)
    try:
        pos = 0
        while pos < size:
            block = src.read(src_key, pos, min(BLOCK_BYTES, size - pos))
            if not block:
                raise CorruptCheckpoint(f"{where}: short read at byte {pos} of {size}")
            cut = max(0, min(len(block), hlen - pos))
            head_hash.update(block[:cut])
            data_hash.update(block[cut:])
            writer.write(block)
            pos += len(block)
            sink.update(len(block))
        if (head_hash.hexdigest(), data_hash.hexdigest()) != sums:
            raise CorruptCheckpoint(
                f"{where}: checksum mismatch while copying; the source is damaged (`dist-ckpt verify` it)"
            )
        written = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if written != size:
        raise CorruptCheckpoint(f"{dst.uri}/{dst_key}: wrote {written} bytes, expected {size}")


copy_object = _copy_object  # the tiers' uploader streams each file of a promotion with it


def copy_checkpoint(
    src: Backend,
    src_prefix: str,
    dst: Backend,
    dst_prefix: str,
    sink: BarSink,
    fence: Fence | None = None,
    keep_references: bool = False,
) -> Copied:
    """Copy one committed checkpoint and commit it at ``dst``/``dst_prefix`` (``fence``: the
    destination's run lock, checked right before ``COMMITTED``). An incremental checkpoint
    becomes self-contained unless ``keep_references`` (:mod:`dist_ckpt.cli.copy_refs`)."""
    meta = read_checkpoint_metadata(src, src_prefix)
    dst_uri = f"{dst.uri}/{dst_prefix}"
    try:
        committed = src.read(join_key(src_prefix, COMMITTED))
        metadata = src.read(join_key(src_prefix, METADATA))
        if dst.exists(join_key(dst_prefix, COMMITTED)):
            raise StepAlreadyExists(
                f"{dst_uri} is already committed; a committed step is never overwritten (delete it "
                "first, or copy elsewhere)"
            )
        staging = dst.staging_prefix(dst_prefix, uuid.uuid4().hex[:12])
    except BackendError as e:
        raise wrap_backend_error(e, dst_uri) from e
    total = sum(r.size for r in meta.files.values())
    sink.add_total(2 * total)  # copy, then read back to verify
    written: list[str] = []
    files = meta.files

    def copy_object(s: Backend, s_key: str, d: Backend, d_key: str, record: FileRecord) -> None:
        _copy_object(s, s_key, d, d_key, record, sink)

    try:
        if any(is_reference(n) for n in files) and not keep_references:
            done = copy_self_contained(src, src_prefix, dst, staging, files, metadata, committed, copy_object, written)
            files, metadata, committed = done.files, done.metadata, done.committed
        else:
            if keep_references:  # the earlier steps' files it reads, at the same relative paths
                copy_referenced_files(src, src_prefix, dst, dst_prefix, files, copy_object)
            for name, record in sorted(files.items()):
                if is_reference(name):
                    continue
                key = join_key(staging, name)
                written.append(key)
                _copy_object(src, join_key(src_prefix, name), dst, key, record, sink)
        problems = verify_files(dst, staging, files, progress=sink)
        if problems:
            raise CorruptCheckpoint(
                f"{dst_uri}: the copy failed verification: " + "; ".join(p.message for p in problems)
            )
        # Where staging is the final prefix (S3), losing a race to another writer of this step
        # means the files may be theirs too: then nothing is removed (`gc` handles leftovers).
        shared = staging == dst_prefix

        def on_written(name: str) -> None:
            if name == METADATA:
                written.append(join_key(staging, METADATA))
            else:
                written.clear()  # committed: from here on nothing is rolled back

        try:
            commit_checkpoint(
                dst, staging, dst_prefix, metadata, committed, where=dst_uri, fence=fence, on_written=on_written
            )
        except StepAlreadyExists:
            if shared:
                written.clear()
            raise
    except BackendError as e:
        _cleanup(dst, staging, dst_prefix, written)
        raise wrap_backend_error(e, dst_uri) from e
    except BaseException:
        _cleanup(dst, staging, dst_prefix, written)
        raise
    return Copied(f"{src.uri}/{src_prefix}", dst_uri, len(files), total)


def _cleanup(dst: Backend, staging: str, final: str, written: list[str]) -> None:
    """Best effort: remove what this copy wrote before it committed (``written`` is emptied
    once nothing may be removed any more)."""
    if not written:
        return
    try:
        if staging != final:
            dst.delete_prefix(staging + "/")
        else:
            for key in written:
                dst.delete(key)
    except BackendError:
        pass  # `dist-ckpt gc` removes whatever is left


def rebuild_manifest(dst: Backend, src_manifest: mf.Manifest | None) -> mf.Manifest:
    """The destination manifest from its COMMITTED markers, adopting the source run's metric
    modes, tracker run id and config hash where the destination has none."""
    store = RunStore(dst)
    src = src_manifest or mf.Manifest()

    def change(cur: mf.Manifest | None) -> mf.Manifest:
        base = cur or mf.Manifest()
        modes = {**src.best_modes, **base.best_modes}
        run_id, config_hash = base.tracker_run_id or src.tracker_run_id, base.config_hash or src.config_hash
        return mf.rebuild(store.committed_entries(), modes, run_id, config_hash)

    return store.update_manifest(change)


def run(args: argparse.Namespace) -> int:
    kind, src, prefix = locate(args.src)
    if kind == "checkpoint":
        dst_uri = args.dst.rstrip("/") or args.dst
        last = dst_uri.rsplit("/", 1)[-1]
        if STEP_RE.match(last) or last == prefix:
            from dist_ckpt.checkpoint_files import split_checkpoint_uri

            root, dst_prefix = split_checkpoint_uri(dst_uri)
            dst = _open(root)
            src_step, dst_step = parse_step_prefix(prefix), parse_step_prefix(dst_prefix)
            if src_step is not None and dst_step != src_step:
                raise ConfigError(
                    f"{args.src} is step {src_step}; a checkpoint keeps its step: copy it to "
                    f"{root}/{prefix} (or just name the run root {root})"
                )
        else:
            dst, dst_prefix = _open(dst_uri), prefix
        names = [(prefix, dst_prefix)]
    else:
        dst, dst_prefix = _open(args.dst), ""
        names = [(step_prefix(e.step),) * 2 for e in RunStore(src).committed_entries()]
    require_safe_writes(args, dst)
    src_manifest = RunStore(src).read_manifest()[0]
    copied: list[Copied] = []
    manifest = None
    with run_locked(dst, args.break_lock) as lock, progress_bar(args, "copy") as bar:
        if kind == "run":
            taken = sorted({n for n, _ in names} & {step_prefix(e.step) for e in RunStore(dst).committed_entries()})
            if taken:
                raise StepAlreadyExists(
                    f"{dst.uri} already has committed {', '.join(taken)}; nothing was copied (copy into a new run root)"
                )
        sink = BarSink(bar)
        try:
            for src_name, dst_name in names:
                copied.append(copy_checkpoint(src, src_name, dst, dst_name, sink, lock.fence, args.keep_references))
        finally:  # also after a failure: the checkpoints committed so far are listed
            if copied and (kind == "run" or parse_step_prefix(dst_prefix) is not None):
                manifest = rebuild_manifest(dst, src_manifest)
    if args.json:
        where = None if manifest is None else {"uri": f"{dst.uri}/{MANIFEST}", "pointers": dict(manifest.pointers)}
        print_json({"copied": [c.__dict__ for c in copied], "verified": True, "manifest": where})
        return 0
    for c in copied:
        print(f"copied {c.source} -> {c.destination} ({c.files} files, {human_size(c.bytes)}, checksums verified)")
    if manifest is not None:
        print(
            f"manifest {dst.uri}/{MANIFEST}: {len(manifest.entries)} checkpoints, pointers "
            + (", ".join(f"{k}={v}" for k, v in sorted(manifest.pointers.items())) or "none")
        )
    if not copied:
        print(f"{src.uri}: no committed checkpoints to copy")
    return 0
