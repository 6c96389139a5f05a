"""The manager's own bookkeeping, saved in every checkpoint and returned on resume.

Best value and evaluations-without-improvement per tracked metric live *in the checkpoint*,
so a resume can never reset them (the bug where a worse metric after a resume overwrote the
best checkpoint because ``best_val_loss`` started again at ``inf``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dist_ckpt.errors import ConfigError
from dist_ckpt.format import json_values
from dist_ckpt.manifest import is_better

KEY = "_dist_ckpt"


@dataclass(frozen=True)
class Progress:
    step: int = -1
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    best: Mapping[str, float] = field(default_factory=dict)
    since_improvement: Mapping[str, int] = field(default_factory=dict)
    tracker_run_id: str | None = None
    config: Mapping[str, Any] | None = None
    objects: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    ddp_buckets: Mapping[str, Any] = field(default_factory=dict)  # dist_ckpt.ddp_buckets: layout per DDP module

    def observe(self, metrics: Mapping[str, float], modes: Mapping[str, str]) -> tuple[Progress, list[str]]:
        """Progress after reporting ``metrics``, and the tracked metrics that improved."""
        best, since, improved = dict(self.best), dict(self.since_improvement), []
        for metric, mode in modes.items():
            if metric not in metrics:
                continue
            if is_better(metrics[metric], best.get(metric), mode):
                best[metric], since[metric] = metrics[metric], 0
                improved.append(metric)
            else:
                since[metric] = since.get(metric, 0) + 1
        return replace(self, best=best, since_improvement=since), improved

    def encode(self) -> str:
        """One JSON string: a single DCP value whatever the keys inside (no template needed)."""
        doc = {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "best": dict(self.best),
            "since_improvement": dict(self.since_improvement),
            "tracker_run_id": self.tracker_run_id,
            "config": dict(self.config) if self.config is not None else None,
            "objects": dict(self.objects),
            "values": dict(self.values),
            "ddp_buckets": dict(self.ddp_buckets),
        }
        return json.dumps(json_values.to_json(doc, KEY))

    @classmethod
    def decode(cls, text: str, where: str) -> Progress:
        doc = json_values.decode(text.encode("utf-8"), where)
        return cls(
            step=int(doc["step"]),
            epoch=doc.get("epoch"),
            metrics=doc.get("metrics") or {},
            best=doc.get("best") or {},
            since_improvement=doc.get("since_improvement") or {},
            tracker_run_id=doc.get("tracker_run_id"),
            config=doc.get("config"),
            objects=doc.get("objects") or {},
            values=doc.get("values") or {},
            ddp_buckets=doc.get("ddp_buckets") or {},
        )


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str) or ":" in name:
            raise ConfigError(f"metrics: name {name!r} must be a string without ':'")
        try:
            out[name] = float(value)  # accepts Python/NumPy numbers and 0-d tensors
        except (TypeError, ValueError) as e:
            raise ConfigError(f"metrics[{name!r}]={value!r}: expected a number") from e
    return out
