"""The manager's side of tiered checkpoints (``CheckpointManager(local_root=...)``).

Every rank writes its shard into its node's local tier (DCP's writer gets the local backend;
the coordinator commits there). Ranks are grouped into nodes by (host name, local root): the
lowest rank of each node is its *leader*. After the local commit, rank 0 hands every rank
``metadata.json`` and ``COMMITTED`` (one broadcast that rides on the end of the save); each
other node's leader commits its own folder with them (its ranks' shards, published from their
staging folder), so every node's local tier is a committed checkpoint of its own shards.
Then each leader enqueues the promotion if due (a durable file: it survives the trainer) and
makes sure the node's uploader runs; ``wait()`` returns only after that.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dist_ckpt import manifest as mf
from dist_ckpt.checkpoint_files import COMMITTED, METADATA
from dist_ckpt.config import ManagerConfig
from dist_ckpt.errors import CheckpointError
from dist_ckpt.format import metadata_json
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.tiers.policy import moved_best, promotion_due, tiered_listing
from dist_ckpt.tiers.queue import PromotionQueue, PromotionRequest
from dist_ckpt.tiers.uploader import apply_local_retention, ensure_uploader, local_steps
from storage_backends import Backend, ObjectExists, join_key, open_backend

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class LocalCommit:
    """What rank 0 hands every rank after a local commit (travels as a broadcast object)."""

    step: int
    metadata: str  # base64 of metadata.json
    committed: str  # base64 of COMMITTED
    promote: bool


class Tiers:
    """One manager's tiers; built on every rank together (one all-gather)."""

    def __init__(
        self,
        config: ManagerConfig,
        root: str,
        *,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
        distributed: bool,
    ):
        assert config.local_root is not None
        self.config = config
        self.root = root
        self.local_root = os.path.abspath(config.local_root)
        os.makedirs(self.local_root, exist_ok=True)
        self.local: Backend = open_backend(self.local_root)
        self.queue = PromotionQueue(self.local_root)
        self.rank = rank
        self._pg, self._distributed = process_group, distributed
        me = (socket.gethostname(), os.path.realpath(self.local_root))
        nodes: list[Any] = [me]
        if distributed:
            nodes = [None] * world_size
            dist.all_gather_object(nodes, me, group=process_group)
        self.node_ranks = tuple(r for r, n in enumerate(nodes) if tuple(n) == me)
        self.is_leader = rank == self.node_ranks[0]
        self.saves = 0  # saves made by this manager (persist_every_n_saves counts them)
        self.enqueued: set[int] = set()
        self.request = PromotionRequest(
            step=0,
            root=root,
            backend_options=dict(config.backend_options),
            best_modes=dict(config.best),
            keep_last=config.keep_last,
            keep_every_n_steps=config.keep_every_n_steps,
            tracker_run_id=config.tracker_run_id,
            config_hash=config.config_hash(),
            local_keep_last=config.local_keep_last,
        )
        self.request.dumps()  # refuse options the uploader could not rebuild, now

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        """On node leaders: remove leftovers of interrupted local saves, adopt (or restart)
        the uploader when the queue holds promotions a dead job or uploader left."""
        if not self.is_leader:
            return
        found = RunStore(self.local).collect_garbage()
        if found.temp_dirs or found.uncommitted_steps:
            log.info("removed leftovers of interrupted local saves in %s: %s", self.local_root, found)
        if self.queue.pending_steps():
            log.info("%s: promotions %s are queued; resuming them", self.local_root, sorted(self.queue.pending_steps()))
            ensure_uploader(self.local_root)

    def local_steps(self) -> list[int]:
        return local_steps(self.local)

    def collect_root_garbage(self, store: RunStore, last_root_step: int | None) -> None:
        """Rank 0 at start: the root's leftovers, sparing steps above the root's last committed
        one — a promotion of them may be in flight from an uploader (this node's or another's).
        Those are removed by a later start once committed, or by `dist-ckpt gc`."""
        found = store.leftovers()

        def spare(name: str) -> bool:
            step = int(name.split("_", 1)[1].split(".", 1)[0].split("/", 1)[0])
            return last_root_step is None or step > last_root_step

        for folder in found.temp_dirs + found.uncommitted_steps:
            if not spare(folder):
                log.warning("removing leftovers of an interrupted save: %s/%s", store.uri, folder)
                store.backend.delete_prefix(folder + "/")
        for key in found.unfinished_uploads:
            if not spare(key):
                store.backend.abort_uploads(key)

    # -- save -------------------------------------------------------------------------------
    def due(self, *, force: bool, moved_best: bool) -> bool:
        """Counts this save; whether it is promoted (rank 0 decides, see :meth:`local_commit`)."""
        self.saves += 1
        return promotion_due(self.saves, self.config.persist_every_n_saves, force=force, moved_best=moved_best)

    def hooks(
        self, step: int, *, force: bool, before: Mapping[str, float], after: Mapping[str, float]
    ) -> tuple[Callable[[], LocalCommit], Callable[[LocalCommit], None]]:
        """The save's two steps after the local commit: rank 0's (what the others need), and
        every rank's (:meth:`on_every_rank`). Every rank counts the save here."""
        promote = self.due(force=force, moved_best=moved_best(before, after))
        return (lambda: self.local_commit(step, promote)), self.on_every_rank

    def everywhere(self, on_every_rank: Callable[[LocalCommit], None], commit: LocalCommit) -> None:
        """A synchronous save's :meth:`on_every_rank`, with its failure raised on every rank."""
        error: str | None = None
        try:
            on_every_rank(commit)
        except Exception as e:  # noqa: BLE001 (every rank must hear of it)
            log.exception("rank %d: completing the local commit of step %d failed", self.rank, commit.step)
            error = f"{type(e).__name__}: {e}"
        errors: list[Any] = [error]
        if self._distributed:
            errors = [None] * dist.get_world_size(self._pg)
            dist.all_gather_object(errors, error, group=self._pg)
        failed = [e for e in errors if e is not None]
        if failed:
            raise CheckpointError(f"save of step {commit.step}: the local commit failed: {failed[0]}")

    def local_commit(self, step: int, promote: bool) -> LocalCommit:
        """Rank 0, after the local commit: what the other ranks need."""
        prefix = step_prefix(step)
        meta = self.local.read(join_key(prefix, METADATA))
        committed = self.local.read(join_key(prefix, COMMITTED))
        return LocalCommit(step, base64.b64encode(meta).decode(), base64.b64encode(committed).decode(), promote)

    def on_every_rank(self, commit: LocalCommit) -> None:
        """Every rank, after the local commit: leaders complete their node's folder, enqueue."""
        if not self.is_leader:
            return
        prefix = step_prefix(commit.step)
        if not self.local.exists(join_key(prefix, COMMITTED)):
            self._commit_node_folder(commit)
        if commit.promote:
            self.queue.enqueue(
                PromotionRequest(**{**self.request.__dict__, "step": commit.step, "enqueued": time.time()})
            )
            self.enqueued.add(commit.step)
            ensure_uploader(self.local_root)
        apply_local_retention(self.local, self.queue, self.config.local_keep_last)

    def _commit_node_folder(self, commit: LocalCommit) -> None:
        prefix = step_prefix(commit.step)
        meta_bytes, committed = base64.b64decode(commit.metadata), base64.b64decode(commit.committed)
        files = metadata_json.loads(meta_bytes, f"{self.local_root}/{prefix}/{METADATA}").files
        staging = None
        for o in self.local.list(f"{prefix}.tmp-"):
            folder, _, name = o.key.partition("/")
            if name in files and files[name].size == o.size:
                staging = folder  # the attempt that wrote this node's shards
                break
        if staging is None:  # this node's ranks wrote nothing (e.g. DDP: rank 0 writes the replicas)
            staging = self.local.staging_prefix(prefix, uuid.uuid4().hex[:12])
        try:
            self.local.create_if_absent(join_key(staging, METADATA), meta_bytes)
        except ObjectExists:
            pass  # our own earlier attempt at this very commit
        self.local.create_if_absent(join_key(staging, COMMITTED), committed)
        self.local.publish(staging, prefix)

    # -- wait / close -----------------------------------------------------------------------
    def wait_persisted(self, timeout: float | None = None) -> None:
        """Every rank: return when every promotion this manager queued is committed at the
        root (each leader watches its node's queue; then all ranks agree)."""
        error: str | None = None
        if self.is_leader:
            try:
                self._wait_here(timeout)
            except CheckpointError as e:
                error = f"{type(e).__name__}: {e}"
        errors: list[Any] = [error]
        if self._distributed:
            errors = [None] * dist.get_world_size(self._pg)
            dist.all_gather_object(errors, error, group=self._pg)
        failed = [e for e in errors if e is not None]
        if failed:
            raise CheckpointError(failed[0])

    def _wait_here(self, timeout: float | None) -> None:
        started = last_note = time.monotonic()
        if self.enqueued & self.queue.pending_steps():
            log.info(
                "waiting for the promotion of steps %s from %s to %s",
                sorted(self.enqueued & self.queue.pending_steps()),
                self.local_root,
                self.root,
            )
        while True:
            queued = self.queue.pending_steps()  # dequeued only once committed at the root, or failed
            failed = [
                (s, self.queue.failure(s)) for s in sorted(self.enqueued - queued) if self.queue.failure(s) is not None
            ]
            pending = sorted(self.enqueued & queued)
            if failed:
                step, reason = failed[0]
                raise CheckpointError(
                    f"step {step} could not be promoted from {self.local_root} to {self.root}: {reason}"
                )
            if not pending:
                return
            ensure_uploader(self.local_root)  # a dead uploader is replaced; its queue resumes
            now = time.monotonic()
            if timeout is not None and now - started > timeout:
                raise CheckpointError(
                    f"steps {pending} not promoted to {self.root} within {timeout:.0f} s "
                    f"(see {self.local_root}/.tiers/uploader.log)"
                )
            if now - last_note >= PROGRESS_EVERY_S:
                last_note = now
                log.info(
                    "waiting %.0f s for the promotion of steps %s to %s (uploader log: %s/.tiers/uploader.log)",
                    now - started,
                    pending,
                    self.root,
                    self.local_root,
                )
            time.sleep(0.05)

    # -- listing ----------------------------------------------------------------------------
    def listing(self, root_entries: list[mf.Entry]) -> tuple[list[mf.Entry], dict[int, tuple[str, ...]]]:
        """The root's entries plus this node's local-only ones, and in which tiers each is
        (``"local"``: this node's tier)."""
        return tiered_listing(root_entries, RunStore(self.local).committed_entries())
