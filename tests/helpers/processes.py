"""This process's children, for the checks that no test leaves a process behind."""
from __future__ import annotations

import os
from multiprocessing import resource_tracker
from pathlib import Path


def child_pids() -> list[int]:
    """Processes whose parent is this one, zombies included (from /proc), except the
    resource tracker multiprocessing keeps for the life of the process."""
    # No public API names the tracker's pid; without it the tracker looks like a leak.
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and int(entry) != tracker:
                pids.append(int(entry))
    return pids


def child_commands() -> dict[int, str]:
    """Each child's pid and the start of its command line (for a readable failure)."""
    found = {}
    for pid in child_pids():
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            pass
    return found
