"""The durable promotion queue of one local tier, in ``<local_root>/.tiers/``.

A request is a JSON file ``queue/step_<n>.json`` written atomically (temp file, fsync,
rename) before the manager's ``wait()`` returns, so it survives the trainer. The uploader
removes it only after the promotion is committed at the root (``done/step_<n>``) or failed
for good (``failed/step_<n>.json``, with the reason). Plain files: the uploader needs no
server, and the next manager start finds what a dead uploader left.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_ckpt.errors import ConfigError
from dist_ckpt.layout import step_prefix

TIERS_DIR = ".tiers"


@dataclass(frozen=True)
class PromotionRequest:
    """What the uploader needs to promote one step, without the trainer: where the root is and
    the root's retention settings (applied after the commit)."""

    step: int
    root: str
    backend_options: dict[str, Any] = field(default_factory=dict)
    best_modes: dict[str, str] = field(default_factory=dict)
    keep_last: int | None = None
    keep_every_n_steps: int | None = None
    tracker_run_id: str | None = None
    config_hash: str | None = None
    local_keep_last: int = 2
    enqueued: float = 0.0

    def dumps(self) -> bytes:
        try:
            return json.dumps(asdict(self), sort_keys=True).encode()
        except TypeError as e:  # e.g. a boto3 client in backend_options
            raise ConfigError(
                f"local_root: the uploader process rebuilds the root backend from backend_options, which must be "
                f"JSON ({e}); pass S3 settings through the environment (AWS_*) or plain options"
            ) from e

    @classmethod
    def loads(cls, data: bytes) -> PromotionRequest:
        doc = json.loads(data.decode())
        return cls(**doc)


def _name(step: int) -> str:
    return step_prefix(step)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PromotionQueue:
    """The queue of the local tier at ``local_root`` (created on first use)."""

    def __init__(self, local_root: str | os.PathLike[str]):
        self.base = Path(local_root) / TIERS_DIR
        self.pending_dir, self.done_dir, self.failed_dir = self.base / "queue", self.base / "done", self.base / "failed"

    def _dirs(self) -> None:
        for d in (self.pending_dir, self.done_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)

    def enqueue(self, request: PromotionRequest) -> None:
        self._dirs()
        data = request.dumps()
        _write_atomic(self.pending_dir / f"{_name(request.step)}.json", data)

    def pending(self) -> list[PromotionRequest]:
        """Queued requests, oldest step first (an unreadable one is reported as failed)."""
        if not self.pending_dir.is_dir():
            return []
        out = []
        for path in sorted(self.pending_dir.glob("step_*.json")):
            try:
                out.append(PromotionRequest.loads(path.read_bytes()))
            except FileNotFoundError:
                continue  # finished meanwhile
            except (ValueError, TypeError, UnicodeDecodeError) as e:
                step = int(path.stem.split("_", 1)[1])
                self.fail(step, f"{path}: unreadable promotion request ({e})")
        return sorted(out, key=lambda r: r.step)

    def pending_steps(self) -> set[int]:
        if not self.pending_dir.is_dir():
            return set()
        return {int(p.stem.split("_", 1)[1]) for p in self.pending_dir.glob("step_*.json")}

    def done(self, step: int) -> None:
        """The promotion of ``step`` is committed at the root: recorded, then dequeued."""
        self._dirs()
        _write_atomic(self.done_dir / _name(step), f"{time.time()}\n".encode())
        (self.pending_dir / f"{_name(step)}.json").unlink(missing_ok=True)

    def fail(self, step: int, reason: str) -> None:
        """The promotion of ``step`` cannot succeed (a damaged local file): recorded with the
        reason, dequeued; the local copy is kept."""
        self._dirs()
        _write_atomic(self.failed_dir / f"{_name(step)}.json", json.dumps({"step": step, "reason": reason}).encode())
        (self.pending_dir / f"{_name(step)}.json").unlink(missing_ok=True)

    def is_done(self, step: int) -> bool:
        return (self.done_dir / _name(step)).exists()

    def failure(self, step: int) -> str | None:
        try:
            return str(json.loads((self.failed_dir / f"{_name(step)}.json").read_bytes())["reason"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def forget(self, step: int) -> None:
        """A local step retention deleted: its records go too."""
        (self.done_dir / _name(step)).unlink(missing_ok=True)
