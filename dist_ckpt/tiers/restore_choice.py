"""Which checkpoint a tiered manager restores, and where each of its files is read from.

Decided collectively: every rank lists the steps it can read — a step committed at the root
(rank 0 lists them, every rank gets the list), or a local step whose every file this rank's
node holds, each verified against its recorded checksum — and the newest step in every rank's
list wins (one all-gather). So a node whose local tier lacks its ranks' shards (a replaced
node, another topology, a wiped disk) makes the job take a step the root has.

Reads then go file by file: from the local tier where the file is there and verified, else
from the root — a damaged local file is named in a warning (the node's leader logs it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from dist_ckpt.checkpoint_files import COMMITTED, METADATA, read_checkpoint_metadata
from dist_ckpt.errors import CheckpointError
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.run_store import parse_step_prefix, step_prefix
from dist_ckpt.verify import verify_file
from storage_backends import Backend, BackendError, ObjectInfo, join_key

if TYPE_CHECKING:
    from dist_ckpt.manager_parts import RestoringParts

log = logging.getLogger(__name__)

_CANDIDATES = 8  # the newest steps considered


class RoutedBackend:
    """Reads of one checkpoint folder, each file from the tier ``routes`` names: a
    :class:`~storage_backends.ReadableStore` (writes are not needed by readers and not offered)."""

    def __init__(self, local: Backend, root: Backend, prefix: str, local_files: set[str], *, all_local: bool):
        self.local, self.root, self.prefix = local, root, prefix
        self.local_files = set(local_files)
        # named for the root unless every file is read locally: a damaged or missing local file
        # (metadata format 2 also has rank index files, which may be sound beside it) is read there
        self.uri = local.uri if all_local else root.uri

    def _for(self, key: str) -> Backend:
        folder, _, name = key.partition("/")
        return self.local if folder == self.prefix and name in self.local_files else self.root

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self._for(key).read(key, start, length)

    def read_into(self, key: str, start: int, out: memoryview) -> int:
        return self._for(key).read_into(key, start, out)

    def size(self, key: str) -> int:
        return self._for(key).size(key)

    def exists(self, key: str) -> bool:
        return self._for(key).exists(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.root.list(prefix)


def _wanted_step(which: Any) -> int | None | bool:
    """``None`` for "last", a step for a step number or name, ``False`` for anything else
    (pointers, paths: resolved at the root as without tiers)."""
    if which == "last" or which is None:
        return None
    if isinstance(which, int) and not isinstance(which, bool):
        return which
    if isinstance(which, str):
        step = int(which) if which.isdigit() else parse_step_prefix(which)
        if step is not None:
            return step
    return False


class LocalCheck:
    """This rank's view of its node's local tier: which files of a step are there and sound."""

    def __init__(self, local: Backend, leader: bool):
        self.local, self.leader = local, leader
        self._sound: dict[int, tuple[set[str], Mapping[str, FileRecord] | None]] = {}

    def sound_files(self, step: int) -> tuple[set[str], Mapping[str, FileRecord] | None]:
        """(files present and verified, the step's file table) — ``(set(), None)`` when the
        step is not committed locally."""
        if step in self._sound:
            return self._sound[step]
        prefix = step_prefix(step)
        result: tuple[set[str], Mapping[str, FileRecord] | None] = (set(), None)
        try:
            if self.local.exists(join_key(prefix, COMMITTED)):
                files = read_checkpoint_metadata(self.local, prefix).files
                sound = set()
                for name, record in files.items():
                    key = join_key(prefix, name)
                    if not self.local.exists(key):
                        continue  # another node's shard
                    problem = verify_file(self.local, key, record)
                    if problem is None:
                        sound.add(name)
                    elif self.leader:
                        log.warning(
                            "local checkpoint file %s/%s is damaged (%s); reading it from the root instead",
                            self.local.uri,
                            key,
                            problem.message,
                        )
                result = (sound, files)
        except (CheckpointError, BackendError) as e:
            if self.leader:
                log.warning("local checkpoint %s/%s is unreadable (%s); using the root", self.local.uri, prefix, e)
        self._sound[step] = result
        return result

    def complete(self, step: int) -> bool:
        sound, files = self.sound_files(step)
        return files is not None and sound == set(files)


def restore_target(mgr: RestoringParts, which: Any) -> tuple[Any, str] | None:
    """The (backend, prefix) to restore from, or None to resolve ``which`` as without tiers
    (pointers, paths, nothing committed anywhere)."""
    tiers = mgr._tiers
    wanted = _wanted_step(which)
    if wanted is False:
        return None
    root_steps: list[int] = mgr._agree(lambda: [e.step for e in mgr.store.committed_entries()])
    check = LocalCheck(tiers.local, tiers.is_leader)
    local = tiers.local_steps()
    candidates = sorted((set(root_steps) | set(local)) if wanted is None else {wanted}, reverse=True)[:_CANDIDATES]
    readable = [s for s in candidates if s in root_steps or check.complete(s)]
    everyone: list[Any] = [readable]
    if mgr._distributed:
        everyone = [None] * mgr.world_size
        dist.all_gather_object(everyone, readable, group=mgr._pg)
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    if not common:
        return None
    step = max(common)
    prefix = step_prefix(step)
    sound, files = check.sound_files(step)
    if tiers.is_leader:
        where = (
            "the local tier"
            if files is not None and sound == set(files)
            else f"the local tier ({len(sound)} files) and the root"
            if sound
            else "the root"
        )
        log.info("rank %d restores step %d from %s", mgr.rank, step, where)
    complete = files is not None and sound == set(files)
    return RoutedBackend(
        tiers.local, mgr.backend, prefix, sound | ({METADATA, COMMITTED} if sound else set()), all_local=complete
    ), prefix
