"""One promotion: a committed local checkpoint made a committed checkpoint at the root.

The node's files are streamed with ``dist-ckpt copy``'s :func:`copy_object` (size and both
checksums checked on the way, so an object that exists at the root is complete and right),
into the root's staging prefix for an attempt id derived from the ``COMMITTED`` marker — the
same on every node, so the nodes of a multi-node job fill one staging prefix, each with its own
ranks' files. Whoever finds every file of ``metadata.json`` there commits with
:func:`dist_ckpt.commit.commit_checkpoint`: ``metadata.json`` and ``COMMITTED`` with
create-if-absent (finding them already there with the same bytes is a finished commit, not a
conflict), then publish. Then the root manifest gets the entry and root
retention runs (:meth:`RunStore.apply_retention`), as after a direct save.

Restartable at any point: a file already at the root with its recorded size is not sent again
(no double upload); an unfinished multipart upload of one of this node's files (a killed
uploader's) is aborted before the file is sent again; a committed step is only recorded.
Nothing of a step is visible at the root before ``COMMITTED``.
"""

from __future__ import annotations

import enum
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import xxhash

from dist_ckpt.checkpoint_files import COMMITTED, METADATA, read_checkpoint_metadata, wrap_backend_error
from dist_ckpt.cli.copy import copy_object
from dist_ckpt.commit import commit_checkpoint
from dist_ckpt.commit_follow_up import RunPolicy, record_commit
from dist_ckpt.errors import StepAlreadyExists
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.tiers.queue import PromotionRequest
from storage_backends import Backend, BackendError, join_key

log = logging.getLogger(__name__)

_PARALLEL_FILES = 4


class Outcome(enum.Enum):
    COMMITTED = "committed"  # the step is committed at the root (by us or before)
    WAITING = "waiting"  # our files are there; another node's are not yet


class _Count:
    """A progress sink for :func:`copy_object` (bytes sent, for the log)."""

    def __init__(self) -> None:
        self.total = 0
        self.sent = 0
        self._lock = threading.Lock()  # files are sent from several threads

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total += n

    def update(self, n: int) -> None:
        with self._lock:
            self.sent += n


def attempt_id(committed: bytes) -> str:
    """The root staging attempt of a promotion: a function of the local COMMITTED marker, so
    every node (and a restarted uploader) uses the same one."""
    return "p" + xxhash.xxh3_64_hexdigest(committed)[:11]


def promote(local: Backend, root: Backend, request: PromotionRequest) -> Outcome:
    """Promote ``request.step`` from ``local`` to ``root`` (see the module docstring)."""
    prefix = step_prefix(request.step)
    where = f"{root.uri}/{prefix}"
    meta = read_checkpoint_metadata(local, prefix)
    try:
        committed = local.read(join_key(prefix, COMMITTED))
        metadata = local.read(join_key(prefix, METADATA))
        final_marker = join_key(prefix, COMMITTED)
        if root.exists(final_marker):
            if root.read(final_marker) != committed:
                raise StepAlreadyExists(f"{where} is committed with a different checkpoint than {local.uri}/{prefix}")
            _record(root, request, committed)
            return Outcome.COMMITTED
        staging = root.staging_prefix(prefix, attempt_id(committed))
        mine = sorted(name for name in meta.files if local.exists(join_key(prefix, name)))
        at_root = {o.key.rsplit("/", 1)[-1]: o.size for o in root.list(staging + "/")}
        sink = _Count()

        def send(name: str) -> None:
            key = join_key(staging, name)
            root.abort_uploads(key)  # a killed uploader's unfinished upload of this file
            copy_object(local, join_key(prefix, name), root, key, meta.files[name], sink)

        # sent before: objects appear only complete (and the stream was checksum-checked)
        todo = [name for name in mine if at_root.get(name) != meta.files[name].size]
        if len(todo) > 1:  # the node's ranks' files at once, as the ranks themselves would send them
            with ThreadPoolExecutor(min(len(todo), _PARALLEL_FILES), thread_name_prefix="dist_ckpt-promote") as pool:
                for future in [pool.submit(send, name) for name in todo]:
                    future.result()
        elif todo:
            send(todo[0])
        if sink.sent:
            log.info("step %d: sent %d bytes of %d files to %s", request.step, sink.sent, len(mine), where)
        at_root = {o.key.rsplit("/", 1)[-1]: o.size for o in root.list(staging + "/")}
        missing = sorted(n for n, r in meta.files.items() if at_root.get(n) != r.size)
        if missing:
            log.info("step %d: waiting for other nodes' files at %s: %s", request.step, where, ", ".join(missing))
            return Outcome.WAITING
        # finding metadata.json / COMMITTED / the published step with our bytes is our own
        # earlier attempt (a restarted uploader, another node), not a conflict
        commit_checkpoint(root, staging, prefix, metadata, committed, where=where, idempotent=True)
    except BackendError as e:
        raise wrap_backend_error(e, where) from e
    _record(root, request, committed)
    return Outcome.COMMITTED


def _record(root: Backend, request: PromotionRequest, committed: bytes) -> None:
    """The root manifest gets the entry (idempotent), then root retention runs — deletes only
    after the manifest without them is durable, as after a direct save."""
    policy = RunPolicy(
        best_modes=request.best_modes,
        keep_last=request.keep_last,
        keep_every_n_steps=request.keep_every_n_steps,
        tracker_run_id=request.tracker_run_id,
        config_hash=request.config_hash,
        overwrite_stamps=False,  # the job's own manager stamps the run; the uploader fills gaps
    )
    record_commit(RunStore(root), request.step, policy, marker=committed)
