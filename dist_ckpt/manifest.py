"""The run manifest: pure functions over a JSON document. No storage, no torch.

``manifest.json`` is an index derived from the committed checkpoints; it can always be
rebuilt from their ``COMMITTED`` markers. It lists the checkpoints (step, epoch, metrics, time,
size, world size, codec), the pointers — ``last`` and one ``best:<metric>`` per tracked
metric — the tracker run id and the config hash.

Pointers are a pure function of the entries: ``last`` is the highest step; ``best:<m>`` is the
entry with the best value of ``m`` (ties go to the earlier step: only a strict improvement
moves a pointer; NaN never wins). Retention never removes a pointed-to entry, so recomputing
pointers after retention gives the same answer as tracking them incrementally.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.layout import MANIFEST

FORMAT = "dist_ckpt.manifest/1"
LAST = "last"
BEST_PREFIX = "best:"


@dataclass(frozen=True)
class Entry:
    """One committed checkpoint as the manifest records it."""

    step: int
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    time: float = 0.0
    size: int = 0
    world_size: int = 1
    codec: str = "none"
    logical_size: int = 0  # own + referenced files (incremental checkpoints); 0: same as size

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": {k: _num_out(v) for k, v in self.metrics.items()},
            "time": self.time,
            "size": self.size,
            "world_size": self.world_size,
            "codec": self.codec,
            **({"logical_size": self.logical_size} if self.logical_size not in (0, self.size) else {}),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Entry:
        return cls(
            step=int(obj["step"]),
            epoch=None if obj.get("epoch") is None else int(obj["epoch"]),
            metrics={str(k): _num_in(v) for k, v in dict(obj.get("metrics") or {}).items()},
            time=float(obj.get("time") or 0.0),
            size=int(obj.get("size") or 0),
            world_size=int(obj.get("world_size") or 1),
            codec=str(obj.get("codec") or "none"),
            logical_size=int(obj.get("logical_size") or 0),
        )


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...] = ()
    pointers: Mapping[str, int] = field(default_factory=dict)
    best_modes: Mapping[str, str] = field(default_factory=dict)
    tracker_run_id: str | None = None
    config_hash: str | None = None

    def steps(self) -> list[int]:
        return [e.step for e in self.entries]

    def entry(self, step: int) -> Entry | None:
        return next((e for e in self.entries if e.step == step), None)


def _num_out(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)  # "nan", "inf", "-inf": JSON has no literal for them


def _num_in(v: Any) -> float:
    return float(v)


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Strict improvement of ``value`` over ``best`` under ``mode`` (``"min"``/``"max"``)."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


def compute_pointers(entries: Iterable[Entry], best_modes: Mapping[str, str]) -> dict[str, int]:
    ordered = sorted(entries, key=lambda e: e.step)
    pointers: dict[str, int] = {}
    if ordered:
        pointers[LAST] = ordered[-1].step
    for metric, mode in best_modes.items():
        best_value: float | None = None
        for e in ordered:
            value = e.metrics.get(metric)
            if value is not None and is_better(value, best_value, mode):
                best_value, pointers[BEST_PREFIX + metric] = value, e.step
    return pointers


def with_entry(manifest: Manifest, entry: Entry, best_modes: Mapping[str, str]) -> Manifest:
    """The manifest after committing ``entry`` (replacing an entry of the same step)."""
    entries = tuple(sorted([e for e in manifest.entries if e.step != entry.step] + [entry], key=lambda e: e.step))
    modes = {**manifest.best_modes, **best_modes}
    return replace(manifest, entries=entries, best_modes=modes, pointers=compute_pointers(entries, modes))


def without_steps(manifest: Manifest, steps: Iterable[int]) -> Manifest:
    drop = set(steps)
    entries = tuple(e for e in manifest.entries if e.step not in drop)
    return replace(manifest, entries=entries, pointers=compute_pointers(entries, manifest.best_modes))


def retention_drops(manifest: Manifest, keep_last: int | None, keep_every_n_steps: int | None = None) -> list[int]:
    """Steps retention deletes: all but the newest ``keep_last``, every pointed-to step, and
    every multiple of ``keep_every_n_steps``. The newest committed step is always kept."""
    if keep_last is None:
        return []
    steps = sorted(manifest.steps())
    keep = set(steps[-max(keep_last, 1) :]) | set(manifest.pointers.values())
    if keep_every_n_steps:
        keep |= {s for s in steps if s % keep_every_n_steps == 0}
    return [s for s in steps if s not in keep]


def rebuild(
    entries: Iterable[Entry],
    best_modes: Mapping[str, str],
    tracker_run_id: str | None = None,
    config_hash: str | None = None,
) -> Manifest:
    """A manifest from the committed checkpoints alone (``COMMITTED`` markers)."""
    ordered = tuple(sorted(entries, key=lambda e: e.step))
    return Manifest(ordered, compute_pointers(ordered, best_modes), dict(best_modes), tracker_run_id, config_hash)


def dumps(manifest: Manifest) -> bytes:
    doc = {
        "format": FORMAT,
        "pointers": dict(sorted(manifest.pointers.items())),
        "best_modes": dict(manifest.best_modes),
        "tracker_run_id": manifest.tracker_run_id,
        "config_hash": manifest.config_hash,
        "checkpoints": [e.to_json() for e in manifest.entries],
    }
    return json.dumps(doc, indent=1).encode("utf-8")


def loads(data: bytes, where: str = MANIFEST) -> Manifest:
    """Parse a manifest; anything malformed raises :class:`CorruptCheckpoint` naming ``where``."""
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"expected format {FORMAT!r}")
        entries = tuple(sorted((Entry.from_json(e) for e in doc["checkpoints"]), key=lambda e: e.step))
        modes = {str(k): str(v) for k, v in dict(doc.get("best_modes") or {}).items()}
        pointers = {str(k): int(v) for k, v in dict(doc.get("pointers") or {}).items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"{where}: not a valid run manifest ({e}); it will be rebuilt from the COMMITTED markers"
        ) from e
    steps = {e.step for e in entries}
    dangling = {k: v for k, v in pointers.items() if v not in steps}
    if dangling:
        raise CorruptCheckpoint(f"{where}: pointers {dangling} name checkpoints the manifest does not list")
    return Manifest(entries, pointers, modes, doc.get("tracker_run_id"), doc.get("config_hash"))
