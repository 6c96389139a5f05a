"""A :class:`storage_backends.Backend` wrapper that injects faults, for the fault suite.

    backend = FaultyBackend(LocalBackend(root), [
        Rule("writer.write", "step_*/rank_00001*", "delay", delay=0.2, count=None),  # slow writes
        Rule("writer.commit", "step_*/rank_*", "fail", error="EIO"),        # fsync fails once
        Rule("create_if_absent", "*/COMMITTED", "exit"),                    # crash before COMMITTED
        Rule("compare_and_swap", "manifest.json", "exit", when="after"),   # crash after the CAS
    ])
    mgr = CheckpointManager(root, backend=backend)

A rule matches an operation name (a backend method such as ``create_if_absent``, or a writer
operation ``writer.write`` / ``writer.commit`` / ``writer.abort``; ``*`` matches every one) and
an ``fnmatch`` glob on the object key (for writers, the key the writer was opened on; for
``publish``, the staging prefix). Of the matching calls made while the wrapper is *armed*, the
``nth`` one (1-based) and the ``count - 1`` after it trigger the action (``count=None``: every
one from the ``nth`` on):

- ``fail``: raise ``error``: an errno name (``EIO``, ``ENOSPC``, ...) gives the
  :class:`BackendError` a real backend raises for that ``OSError`` (``raw=True``: the bare
  ``OSError``), or one of ``BackendError``, ``ObjectNotFound``, ``PreconditionFailed``,
  ``ObjectExists``, or ``RuntimeError`` (not a storage error: a bug); ``message`` (formatted
  with ``op``, ``key``, ``nth``) replaces the default text. A failing writer operation aborts the
  real writer first, as the real
  backends do on an I/O error.
- ``exit``: ``os._exit(exit_code)`` — the process dies on the spot, no cleanup, no finally.
- ``delay``: sleep ``delay`` seconds, then carry on (slow storage).
- ``crash``: in-process stand-in for a kill: raise :class:`SimulatedCrash` (a
  ``BaseException``) and turn the wrapper *dead*: every later operation raises it too and
  writer aborts do nothing, so nothing the library does afterwards reaches the storage.
- ``call``: call ``hook(op, key)`` (in-process only; e.g. look at the storage from another
  mount, or wait on a barrier).

``when`` is ``"before"`` (default) or ``"after"`` the real operation. ``ranks`` limits a rule
to some ranks (the ``RANK`` environment variable, or ``rank=`` given to the wrapper).

Configurable from JSON, so ``torchrun`` workers and subprocesses can use it::

    DIST_CKPT_FAULTS='{"rules": [{"op": "create_if_absent", "key": "*/COMMITTED", "action": "exit"}],
                       "log": "/tmp/faults.jsonl", "armed": false}'
    backend = FaultyBackend.from_env(open_backend(root))   # in the job
    backend.arm()                                          # e.g. once it reached the step to hit

The wrapper pickles (rules included, ``call`` rules excepted), so ``async_mode="process"``
writer processes apply the same rules. Every triggered action is counted in ``injected`` and,
when ``log`` is set, appended to that file as a JSON line (flushed before an ``exit``) so the test
process can see what happened.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from storage_backends import BackendError, ObjectExists, ObjectNotFound, PreconditionFailed
from storage_backends.base import ObjectInfo, Versioned

__all__ = ["ENV_VAR", "FaultyBackend", "FaultyWriter", "Rule", "SimulatedCrash"]

ENV_VAR = "DIST_CKPT_FAULTS"
_ACTIONS = ("fail", "exit", "delay", "crash", "call")
_ERRORS: dict[str, type[Exception]] = {
    "BackendError": BackendError,
    "ObjectNotFound": ObjectNotFound,
    "PreconditionFailed": PreconditionFailed,
    "ObjectExists": ObjectExists,
    "RuntimeError": RuntimeError,  # not a storage error at all: a bug in the worker
}


class SimulatedCrash(BaseException):
    """Raised by the ``crash`` action: the in-process stand-in for the process being killed."""


@dataclass
class Rule:
    op: str | tuple[str, ...] = "*"
    key: str = "*"
    action: str = "fail"
    when: str = "before"
    nth: int = 1
    count: int | None = 1
    error: str = "EIO"
    raw: bool = False
    delay: float = 0.0
    exit_code: int = 137
    message: str | None = None
    ranks: tuple[int, ...] | None = None
    hook: Callable[[str, str], None] | None = field(default=None, repr=False)
    matched: int = 0
    triggered: int = 0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; expected one of {_ACTIONS}")
        if self.when not in ("before", "after"):
            raise ValueError(f"when={self.when!r}: expected 'before' or 'after'")
        if self.action == "fail" and self.error not in _ERRORS and not hasattr(errno, self.error):
            raise ValueError(f"error={self.error!r}: expected an errno name or one of {sorted(_ERRORS)}")
        if self.action == "call" and self.hook is None:
            raise ValueError("action 'call' needs hook=")
        if self.ranks is not None:
            self.ranks = tuple(self.ranks)
        if isinstance(self.op, list):
            self.op = tuple(self.op)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rule:
        allowed = {f.name for f in fields(cls)} - {"hook", "matched", "triggered"}  # hooks: in-process only
        unknown = set(obj) - allowed
        if unknown:
            raise ValueError(f"unknown fault rule fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**obj)

    def matches(self, op: str, key: str, rank: int | None) -> bool:
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if "*" not in ops and op not in ops:
            return False
        if self.ranks is not None and rank not in self.ranks:
            return False
        return fnmatch.fnmatchcase(key, self.key)


class FaultyBackend:
    """Wraps ``inner`` (any Backend) and applies ``rules``; see the module docstring."""

    def __init__(
        self,
        inner: Any,
        rules: list[Rule] | None = None,
        *,
        rank: int | None = None,
        log: str | None = None,
        armed: bool = True,
    ):
        self.inner = inner
        self.uri = inner.uri
        self.rules: list[Rule] = list(rules or [])
        self.rank = rank if rank is not None else _env_rank()
        self.log_path = log
        self.armed = armed
        self.dead = False
        self.calls: Counter[str] = Counter()
        self.injected: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, inner: Any, config: dict[str, Any] | str, *, rank: int | None = None) -> FaultyBackend:
        if isinstance(config, str):
            config = json.loads(config)
        rules = [Rule.from_json(r) for r in config.get("rules", [])]
        return cls(inner, rules, rank=rank, log=config.get("log"), armed=bool(config.get("armed", True)))

    @classmethod
    def from_env(cls, inner: Any, *, var: str = ENV_VAR, rank: int | None = None) -> FaultyBackend:
        """The wrapper configured by ``$DIST_CKPT_FAULTS`` (no rules when it is unset)."""
        return cls.from_config(inner, os.environ.get(var) or "{}", rank=rank)

    @staticmethod
    def env(rules: list[dict[str, Any]], *, log: str | None = None, armed: bool = True) -> dict[str, str]:
        """``{DIST_CKPT_FAULTS: json}`` for a subprocess environment."""
        for r in rules:
            Rule.from_json(r)  # validate here, not in the child
        return {ENV_VAR: json.dumps({"rules": rules, "log": log, "armed": armed})}

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule and what was injected so far."""
        with self._lock:
            self.rules.clear()
            self.injected.clear()

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    # -- the injection point ------------------------------------------------------------------
    def _fire(self, op: str, key: str, when: str, writer: Any = None) -> None:
        if self.dead:
            raise SimulatedCrash(f"{op} {key}: the process is (simulated) dead")
        actions: list[Rule] = []
        with self._lock:
            if when == "before":
                self.calls[op] += 1
            if not self.armed:
                return
            for rule in self.rules:
                if rule.when != when or not rule.matches(op, key, self.rank):
                    continue
                rule.matched += 1
                if rule.matched < rule.nth or (rule.count is not None and rule.triggered >= rule.count):
                    continue
                rule.triggered += 1
                actions.append(rule)
                self.injected.append((op, key, rule.action))
        for rule in actions:
            self._record(op, key, rule)
            self._act(rule, op, key, writer)

    def _record(self, op: str, key: str, rule: Rule) -> None:
        if not self.log_path:
            return
        line = json.dumps(
            {
                "op": op,
                "key": key,
                "action": rule.action,
                "when": rule.when,
                "error": rule.error if rule.action == "fail" else None,
                "rank": self.rank,
                "pid": os.getpid(),
                "time": time.time(),
            }
        )
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _act(self, rule: Rule, op: str, key: str, writer: Any) -> None:
        if rule.action == "delay":
            time.sleep(rule.delay)
        elif rule.action == "call":
            assert rule.hook is not None
            rule.hook(op, key)
        elif rule.action == "exit":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rule.exit_code)
        elif rule.action == "crash":
            self.dead = True
            raise SimulatedCrash(f"simulated crash {rule.when} {op} {key}")
        else:  # fail
            if writer is not None:
                writer.abort()  # what a real backend does when a write/fsync/close fails
            raise self._error(rule, op, key)

    def _error(self, rule: Rule, op: str, key: str) -> BaseException:
        where = f"{self.uri}/{key}"
        if rule.message is not None:
            text = rule.message.format(op=op, key=key, nth=rule.matched)
            if rule.error == "RuntimeError":
                return RuntimeError(text)
            return _ERRORS.get(rule.error, BackendError)(text, key=key, code=rule.error)  # type: ignore[call-arg]
        if rule.error == "RuntimeError":
            return RuntimeError(f"{op} of {where}: injected bug")
        if rule.error in _ERRORS:
            return _ERRORS[rule.error](f"{op} of {where} failed ({rule.error}, injected)", key=key, code=rule.error)
        num = getattr(errno, rule.error)
        text = os.strerror(num)
        if rule.raw:
            return OSError(num, f"{text} (injected)", where)
        return BackendError(f"{op} of {where} failed: {text} [{rule.error}] (injected)", key=key, code=rule.error)

    def _run(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        self._fire(op, key, "before")
        result = fn()
        self._fire(op, key, "after")
        return result

    # -- the Backend protocol -----------------------------------------------------------------
    def open_writer(self, key: str, *, reserve_head: int = 0) -> FaultyWriter:
        inner = self._run("open_writer", key, lambda: self.inner.open_writer(key, reserve_head=reserve_head))
        return FaultyWriter(self, key, inner)

    def write_bytes(self, key: str, data: bytes) -> None:
        return self._run("write_bytes", key, lambda: self.inner.write_bytes(key, data))

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self._run("read", key, lambda: self.inner.read(key, start, length))

    def read_into(self, key: str, start: int, out: memoryview) -> int:
        return self._run("read_into", key, lambda: self.inner.read_into(key, start, out))

    def size(self, key: str) -> int:
        return self._run("size", key, lambda: self.inner.size(key))

    def exists(self, key: str) -> bool:
        return self._run("exists", key, lambda: self.inner.exists(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self._run("list", prefix, lambda: self.inner.list(prefix))

    def delete(self, key: str) -> None:
        return self._run("delete", key, lambda: self.inner.delete(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._run("delete_prefix", prefix, lambda: self.inner.delete_prefix(prefix))

    def create_if_absent(self, key: str, data: bytes) -> None:
        return self._run("create_if_absent", key, lambda: self.inner.create_if_absent(key, data))

    def read_versioned(self, key: str) -> Versioned | None:
        return self._run("read_versioned", key, lambda: self.inner.read_versioned(key))

    def compare_and_swap(self, key: str, data: bytes, expected_version: str | None) -> str:
        return self._run("compare_and_swap", key, lambda: self.inner.compare_and_swap(key, data, expected_version))

    def staging_prefix(self, final_prefix: str, attempt: str) -> str:
        return self.inner.staging_prefix(final_prefix, attempt)

    def publish(self, staging_prefix: str, final_prefix: str) -> None:
        return self._run("publish", staging_prefix, lambda: self.inner.publish(staging_prefix, final_prefix))

    def abandoned_uploads(self, prefix: str = "", **kwargs: Any) -> Iterator[str]:
        return iter(
            self._run("abandoned_uploads", prefix, lambda: list(self.inner.abandoned_uploads(prefix, **kwargs)))
        )

    def abort_uploads(self, prefix: str = "", **kwargs: Any) -> int:
        return self._run("abort_uploads", prefix, lambda: self.inner.abort_uploads(prefix, **kwargs))

    def __getattr__(self, name: str) -> Any:  # bucket, client, stats, lock, close, ...
        if name in ("inner", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. into ``async_mode="process"``'s writer process, which then applies
        the same rules there); ``call`` rules (in-process hooks) are left behind."""
        state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
        state["rules"] = [r for r in self.rules if r.hook is None]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultyBackend({self.inner!r}, {len(self.rules)} rules)"


class FaultyWriter:
    """The wrapper's :class:`ObjectWriter`: ``writer.write`` / ``writer.commit`` / ``writer.abort``."""

    def __init__(self, backend: FaultyBackend, key: str, inner: Any):
        self._b, self.key, self.inner = backend, key, inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._b._fire("writer.write", self.key, "before", self.inner)
        self.inner.write(data)
        self._b._fire("writer.write", self.key, "after", self.inner)

    def commit(self, head: bytes = b"") -> int:
        self._b._fire("writer.commit", self.key, "before", self.inner)
        size = self.inner.commit(head)
        self._b._fire("writer.commit", self.key, "after")
        return size

    def abort(self) -> None:
        if self._b.dead:
            return  # a killed process cleans nothing up
        self._b._fire("writer.abort", self.key, "before")
        self.inner.abort()

    def __getattr__(self, name: str) -> Any:  # upload_id, parts_uploaded, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __enter__(self) -> FaultyWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def _env_rank() -> int | None:
    value = os.environ.get("RANK")
    return int(value) if value is not None and value.isdigit() else None
