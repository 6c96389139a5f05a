"""Where things are in a run root: the one definition of every fixed file name and of the step
folder names. No torch, no storage: the writer, the readers, the command line and the tiers
all name files through here, so the on-disk layout is written down once.

A run root holds ``manifest.json`` (:mod:`dist_ckpt.manifest`), ``LOCK`` (the run's writer
lock, :mod:`dist_ckpt.run_lock`) and one folder per committed step, ``step_<9+ digits>``,
each with ``metadata.json`` and, once committed, ``COMMITTED`` (:mod:`dist_ckpt.commit_record`).
A save in progress writes into ``step_<N>.tmp-<attempt>`` where the backend stages (local).
"""

from __future__ import annotations

import re

from dist_ckpt.errors import ConfigError

COMMITTED = "COMMITTED"
METADATA = "metadata.json"
MANIFEST = "manifest.json"
LOCK = "LOCK"

STEP_PREFIX = "step_"  # what every step folder's name starts with: list(STEP_PREFIX) finds them all
STEP_RE = re.compile(r"^step_(\d{9,})$")
TMP_RE = re.compile(r"^step_\d+\.tmp-[0-9a-f]+$")


def step_prefix(step: int) -> str:
    """The folder name of ``step``: ``step_000001000``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        # ConfigError (a ValueError): inside the manager's rank-0 decisions it reaches every rank
        raise ConfigError(f"step must be a non-negative int, got {step!r}")
    return f"{STEP_PREFIX}{step:09d}"


def parse_step_prefix(name: str) -> int | None:
    """The step a folder name names; None for anything that is not a step folder."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def committed_key(step: int) -> str:
    """The run-root-relative key of ``step``'s ``COMMITTED`` marker."""
    return f"{step_prefix(step)}/{COMMITTED}"
