"""Processes seen through /proc: this process's children (for the checks that no test
leaves a process behind), a process's descendants, and whether one is still running."""
from __future__ import annotations

import os
from multiprocessing import resource_tracker
from pathlib import Path


def child_pids() -> list[int]:
    """Processes whose parent is this one, zombies included, except the resource tracker
    multiprocessing keeps for the life of the process."""
    # No public API names the tracker's pid; without it the tracker looks like a leak.
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    me = os.getpid()
    return [pid for pid, parent in _parents().items() if parent == me and pid != tracker]


def child_commands() -> dict[int, str]:
    """Each child's pid and the start of its command line (for a readable failure)."""
    found = {}
    for pid in child_pids():
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            pass
    return found


def descendants(pid: int) -> set[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, or stopped: neither gone nor a zombie."""
    try:
        return _stat_fields(Path(f"/proc/{pid}/stat").read_text())[0] != "Z"
    except OSError:
        return False


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat_fields(Path(f"/proc/{entry}/stat").read_text())[1])
            except OSError:
                continue
    return parents


def _stat_fields(stat: str) -> list[str]:
    """The fields after the command name (which may hold spaces and parentheses)."""
    return stat.rsplit(")", 1)[1].split()
