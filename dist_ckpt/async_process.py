"""``async_mode="process"``: the background saves of one rank run in a separate process.

The process is started once (a fresh interpreter running :func:`main`), when the manager is created, and
serves every save of that
manager. Its ranks (one per training rank) join their own gloo group — rendezvous on the
store the training job already uses (``MASTER_ADDR``/``MASTER_PORT``), under a prefix that
rank 0 draws and broadcasts; without those variables rank 0 hosts a fresh ``TCPStore``.

The staging buffer is shared memory (see :mod:`dist_ckpt.staging`); it is sent over the pipe
once per layout (torch's reducers pass its file descriptor, nothing is copied) and mapped by
the process. Each save then sends only the small part: the layout, the values' JSON bytes,
the prefix, the commit info and (rank 0) the run lock's fence, which the process checks right
before ``COMMITTED``; the reply is "ok" or the error. The manifest update and the
exchange of outcomes between ranks stay in the training process (its relay thread).

The process ignores SIGINT and SIGTERM (a preempted job still needs it for the final save),
exits when told to, when its pipe closes, or when its parent dies; ``close()`` joins it (and
kills it if it does not stop), so no zombie or orphan is left.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp  # registers torch's reducers (tensors over pipes)

from dist_ckpt.config import ManagerConfig
from dist_ckpt.errors import CheckpointError, rebuild_error
from dist_ckpt.staging import encode_values
from storage_backends import Backend

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
PG_TIMEOUT_S = 600.0


class WriterProcess:
    """Parent side: starts the process, sends buffers and save requests, relays the replies."""

    def __init__(
        self,
        config: ManagerConfig,
        backend: Backend,
        *,
        rank: int,
        world_size: int,
        control_group: dist.ProcessGroup | None,
        cache_key: str,
    ):
        self._store: Any = None  # kept alive on rank 0 when it hosts the rendezvous
        rendezvous = self._rendezvous(rank, control_group)
        try:
            backend_spec: Any = ("object", pickle.dumps(backend))
        except Exception:  # noqa: BLE001 (e.g. a boto3 client): reopen it there by URI
            backend_spec = ("uri", backend.uri, dict(config.backend_options))
        init = {
            "rank": rank,
            "world_size": world_size,
            "rendezvous": rendezvous,
            "backend": backend_spec,
            "compression": config.compression,
            "compression_level": config.compression_level,
            "cache_key": cache_key,
            "parent": os.getpid(),
        }
        # A fresh interpreter (not multiprocessing's "spawn", which re-runs the user's __main__
        # module and breaks scripts without an ``if __name__ == "__main__"`` guard).
        self._conn, child_conn = mp.Pipe()
        fd = child_conn.fileno()
        code = f"import sys; sys.path[:0] = {list(sys.path)!r}; from dist_ckpt.async_process import main; main({fd})"
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(fd,), close_fds=True
        )
        child_conn.close()
        # the tensors' file descriptors travel through multiprocessing's resource sharer,
        # which authenticates with this process's authkey
        self._conn.send({**init, "authkey": bytes(mp.current_process().authkey)})
        self._ready = False
        self._sent_generation = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _exitcode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _rendezvous(self, rank: int, group: dist.ProcessGroup | None) -> dict[str, Any] | None:
        if group is None:
            return None
        info: list[Any] = [None]
        if dist.get_rank(group) == 0:
            host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
            if not host or not port:
                self._store = dist.TCPStore(socket.gethostname(), 0, is_master=True, wait_for_workers=False)
                host, port = socket.gethostname(), str(self._store.port)
            info = [{"host": host, "port": int(port), "prefix": f"dist_ckpt_async/{uuid.uuid4().hex}"}]
        dist.broadcast_object_list(info, src=dist.get_global_rank(group, 0), group=group)
        return info[0]

    def _recv(self, timeout: float | None = None) -> tuple[str, Any]:
        waited = 0.0
        while not self._conn.poll(0.2):
            waited += 0.2
            if self._exitcode() is not None:
                raise CheckpointError(f"the background writer process exited (code {self._exitcode()})")
            if timeout is not None and waited > timeout:
                raise CheckpointError(f"the background writer process did not answer within {timeout:.0f}s")
        try:
            return self._conn.recv()
        except EOFError as e:
            raise CheckpointError(f"the background writer process exited (code {self._exitcode()})") from e

    def _check(self, reply: tuple[str, Any]) -> None:
        kind, value = reply
        if kind == "err":
            type_name, message, tb = value
            log.debug("writer process traceback:\n%s", tb)
            raise rebuild_error(type_name, f"{message} (in the writer process)")

    def save(self, job: Any) -> None:
        """Write ``job`` (an :class:`~dist_ckpt.async_job.Job`) there; raises its error."""
        if not self._ready:
            self._check(self._recv(READY_TIMEOUT_S))
            self._ready = True
        if job.generation != self._sent_generation:
            self._conn.send(("buffer", job.buffer))
            self._sent_generation = job.generation
        snap = job.snapshot
        encoded, value_error = None, snap.value_error
        if value_error is None:
            try:  # here, not there: only bytes cross the pipe (an error is raised there, inside DCP)
                encoded = encode_values(snap.values)
            except Exception as e:  # noqa: BLE001
                value_error = (type(e).__name__, str(e))
        self._conn.send(
            (
                "save",
                {
                    "prefix": job.prefix,
                    "commit_info": job.commit_info,
                    "specs": snap.specs,
                    "encoded": encoded,
                    "value_error": value_error,
                    "order": snap.order,
                    "mappings": snap.mappings,
                    "fence": job.fence,
                    "spread": snap.spread,
                },
            )
        )
        self._check(self._recv())

    def close(self, timeout: float = 60.0) -> None:
        """Stop the process and reap it (terminate, then kill, if it does not stop)."""
        if self._proc is None:
            return
        try:
            self._conn.send(("stop", None))
        except (OSError, ValueError):
            pass
        for stop in (None, self._proc.terminate, self._proc.kill):
            if stop is not None:
                stop()
            try:
                self._proc.wait(timeout if stop is None else 5)
                break
            except subprocess.TimeoutExpired:
                continue
        self._conn.close()
        self._proc = None
        self._store = None


# -- the process --------------------------------------------------------------------------------
def _watch_parent(parent: int) -> None:
    import time

    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)  # orphaned: the training process is gone


def main(fd: int) -> None:
    """Entry point of the writer process (``fd``: its end of the pipe)."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    init = conn.recv()
    mp.current_process().authkey = init["authkey"]
    _serve(conn, init)


def _serve(conn: Any, init: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(init["parent"],), daemon=True).start()
    try:
        from dist_ckpt.api import resolve_codec
        from dist_ckpt.async_write import write_snapshot
        from dist_ckpt.staging import Snapshot, shards_of, views
        from storage_backends import open_backend

        rdv = init["rendezvous"]
        if rdv is not None:
            store = dist.TCPStore(rdv["host"], rdv["port"], is_master=False, timeout=timedelta(seconds=PG_TIMEOUT_S))
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(rdv["prefix"], store),
                rank=init["rank"],
                world_size=init["world_size"],
                timeout=timedelta(seconds=PG_TIMEOUT_S),
            )
        spec = init["backend"]
        backend = pickle.loads(spec[1]) if spec[0] == "object" else open_backend(spec[1], **spec[2])
        codec = resolve_codec(init["compression"], init["compression_level"])
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001
        conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))
        return
    buffer = None
    try:
        while True:
            try:
                kind, body = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "stop":
                break
            if kind == "buffer":
                buffer = body
                continue
            try:
                tensors = views(buffer, body["specs"])
                encoded = body["encoded"] or {fqn: b"" for fqn in body["order"] if fqn not in tensors}
                snap = Snapshot(
                    tensors,
                    encoded,
                    body["specs"],
                    body["order"],
                    body["mappings"],
                    shards_of(body["specs"]),
                    encoded=encoded,
                    value_error=body["value_error"],
                    spread=body["spread"],
                )
                write_snapshot(
                    backend,
                    body["prefix"],
                    snap,
                    codec=codec,
                    commit_info=body["commit_info"],
                    process_group=None,
                    cache_key=init["cache_key"],
                    fence=body["fence"],
                )
                reply: tuple[str, Any] = ("ok", None)
            except BaseException as e:  # noqa: BLE001
                reply = ("err", (type(e).__name__, str(e), traceback.format_exc(limit=8)))
            conn.send(reply)
    finally:
        buffer = None
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
