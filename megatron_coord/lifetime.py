"""Dying with one's owner: every process of a launch ends when the process that started it dies.

torchrun starts each worker in a session of its own, so a torchrun agent killed with SIGKILL
(the OOM killer, a scheduler, a user) leaves its workers running, and they in turn would leave
the coordinator and HTTP processes they spawned: orphans holding ports and memory. Linux can
signal a process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); each process of a launch
asks for that as it starts:

============================  ===========  ==================================================
process                       its owner    signal on the owner's death
============================  ===========  ==================================================
torchrun worker (Replica)     the agent    SIGKILL: nobody is left to answer to, so nothing to
                                           drain; its children follow by their own signal
coordinator (rank 0's child)  rank 0       SIGHUP: ``GracefulShutdown`` fails what is in
                                           flight with ``shutting_down`` and exits at once
HTTP server (rank 0's child)  rank 0       SIGKILL: its connections are reset
============================  ===========  ==================================================

The kernel sends the signal when the *thread* that created the process exits, not the whole
parent process: children must be started from a thread that lives as long as the parent (the
main thread, as ``spawn_coordinator`` and ``HTTPServerProcess.start`` are called from). A
parent that died before the request took effect is caught by comparing ``getppid()`` with the
parent's pid afterwards. Elsewhere than on Linux this does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits.

    True if the request took effect (Linux), False where it is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    return False


def die_with_parent(signum: int, parent_pid: int | None = None) -> None:
    """Get ``signum`` when the parent dies; exit at once if it already has.

    ``parent_pid``: the pid the parent had (a spawned child is told it); None: this process's
    parent as it is now (a torchrun worker, whose agent's pid is not passed down). The window
    before this call is not covered in that case: call it as early as possible.
    """
    expected = os.getppid() if parent_pid is None else parent_pid
    set_parent_death_signal(signum)
    if os.getppid() != expected:  # the parent died before the request took effect
        log.error("the parent process (pid %d) is gone; exiting", expected)
        os._exit(1)


def warn_unless_main_thread(what: str) -> None:
    """Children die with the thread that starts them: say so if it is not the main thread."""
    if threading.current_thread() is not threading.main_thread():
        log.warning(
            "%s started from thread %r: it gets its parent-death signal when that thread "
            "exits, not when this process does",
            what,
            threading.current_thread().name,
        )
