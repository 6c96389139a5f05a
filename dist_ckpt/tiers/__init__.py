"""Tiered checkpoints: commit to a fast node-local tier, promote to the run root in the background.

- :mod:`.policy` — which saves are promoted; which local steps retention may delete.
- :mod:`.queue` — the durable promotion queue in ``<local_root>/.tiers/`` (requests, done, failed).
- :mod:`.promote` — one promotion: a node's files streamed to the root with the copy code of
  ``dist-ckpt copy``, committed there with the same protocol (create-if-absent, publish), then
  the root manifest and root retention.
- :mod:`.uploader` — the detached node-local process that drains the queue (one per local root,
  an ``flock`` guards it), and how a manager starts or adopts it.
- :mod:`.node` — the manager's side: which ranks share a local root, completing a local commit
  on every node, enqueueing, waiting for persistence, listing tiers.
- :mod:`.restore_choice` — the collective choice of the checkpoint to restore and the per-file
  routing of reads (local, verified by checksum, else root).
"""
