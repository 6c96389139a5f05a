"""Test helpers that rewrite a checkpoint *consistently* (every size and checksum agrees), as
an attacker with write access could: the library must then refuse on content, not checksums.

Format 2 keeps per-entry checksums in each shard's rank index file; :func:`restamp_index`
rewrites that index (and its file-table record) for a rewritten shard."""

from __future__ import annotations

import json
from pathlib import Path

from dist_ckpt.format.rank_index import index_entry
from dist_ckpt.format.shard import save_shard
from storage_backends.local import LocalBackend


def restamp_index(step: Path, shard: str, sums: dict[str, str], stored: dict[str, int]) -> None:
    """Rewrite ``shard``'s rank index with ``sums``/``stored`` and record it in metadata.json."""
    doc = json.loads((step / "metadata.json").read_text())
    name = doc["files"][shard]["index"]
    written = save_shard(LocalBackend(str(step)), name, [index_entry(shard, sums, stored)], None)
    doc["files"][name].update(size=written.size, checksum=written.checksum)
    (step / "metadata.json").write_text(json.dumps(doc))
