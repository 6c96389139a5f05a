"""Preemption: a SIGTERM handler that only sets a flag, and an agreed ``should_stop()``.

With ``save_on_sigterm=True`` the manager installs a handler for SIGTERM (in the main thread;
the previous handler is put back by ``close()``). The handler does nothing but set a flag:
no I/O, no collectives, nothing that could deadlock inside a signal handler.
``mgr.should_stop()`` all-reduces the flag (MAX, one integer on the manager's gloo control
group), so it turns True on every rank at the same call once any rank got the signal. The
training loop then saves the current step and exits::

    for step in range(start, steps):
        train_step()
        stop = mgr.should_stop()          # a collective: every rank, every step
        mgr.save(step, state, metrics=m, force=stop)
        if stop:
            mgr.exit_after_preemption()   # waits for the save, closes, exits with 143

A second SIGTERM changes nothing (the flag is already set); SIGKILL after the scheduler's
grace period cannot be handled — the last committed checkpoint then stays the latest.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a process killed by SIGTERM reports to a shell


class Preemption:
    def __init__(self, group: dist.ProcessGroup | None, *, install: bool):
        self._group = group
        self._flag = False
        self._previous: Any = None
        self._installed = False
        if not install:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "save_on_sigterm=True: the manager was created outside the main thread; "
                "no SIGTERM handler was installed (signals are delivered to the main thread only)"
            )
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag = True

    def should_stop(self) -> bool:
        """True on every rank once any rank got SIGTERM. A collective: call it on every rank."""
        local = self._flag
        if self._group is None:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        stop = bool(flag.item())
        if stop and not local:
            log.warning("another rank received SIGTERM: stopping")
        elif stop:
            log.warning("SIGTERM received: stopping")
        return stop

    def restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
