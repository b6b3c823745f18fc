"""Who holds a TCP port: for the one-line error of a service whose chosen port is taken.

Linux only (``/proc/net/tcp*`` and ``/proc/<pid>/fd``); elsewhere, or for a process of another
user, the error simply names the port.
"""

from __future__ import annotations

import os

_LISTEN = "0A"


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == _LISTEN
            if listening and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def _command_of(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in args if a)[:120]


def port_holder(port: int) -> str | None:
    """``"pid N (command line)"`` of a process listening on ``port``, None if unknown."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return f"pid {pid} ({_command_of(pid)})"
            except OSError:
                continue
    return None


def port_in_use_message(host: str, port: int) -> str:
    """The one-line error for a port that cannot be bound because something holds it."""
    holder = port_holder(port)
    held = f"held by {holder}" if holder else "in use by another process"
    return f"cannot bind {host}:{port}: the port is {held}"
