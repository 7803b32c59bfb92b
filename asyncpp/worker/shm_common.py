"""What the shared-memory transports between CPU ranks of one machine have in common:
the mapped file (created zero-filled with its pages reserved, found again by path, proven
by a random token), the cleanup of files whose creator died, and waiting for a flag that
another process sets.

Ordering relies on x86-64's total store order: data stores become visible before the
flag store that follows them, and loads are not reordered with other loads. Other
architectures use the world's library (gloo) instead.
"""
from __future__ import annotations

import mmap
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable

CACHE_LINE = 64  # one flag per cache line: no false sharing between writers
TOKEN_BYTES = 16
SHM_PREFIX = "asyncpp-"  # then the kind ("tp", "pp"), "-", the creator's pid, "-", a random name
_SPIN_BEFORE_YIELD = 64  # busy checks before giving the core away (ranks may outnumber cores)


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def create_mapping(kind: str, total: int) -> tuple[str, mmap.mmap]:
    """A new zero-filled shared file of `total` bytes, mapped. Its pages are reserved at
    once, so a full /dev/shm fails here (OSError) rather than with SIGBUS on first touch."""
    remove_stale_regions()
    fd, path = tempfile.mkstemp(prefix=f"{SHM_PREFIX}{kind}-{os.getpid()}-", dir=shm_dir())
    try:
        os.ftruncate(fd, total)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, total)
        return path, mmap.mmap(fd, total)
    except BaseException:
        unlink_quietly(path)
        raise
    finally:
        os.close(fd)


def attach_mapping(path: str, total: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != total:
            raise ValueError(f"{path} is not the size this rank expects")
        return mmap.mmap(fd, total)
    finally:
        os.close(fd)


def write_token(buffer: mmap.mmap, offset: int) -> None:
    buffer[offset: offset + TOKEN_BYTES] = secrets.token_bytes(TOKEN_BYTES)


def read_token(buffer: mmap.mmap, offset: int) -> bytes:
    return bytes(buffer[offset: offset + TOKEN_BYTES])


def unlink_quietly(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def remove_stale_regions() -> None:
    """Files left by a creator killed between creating and unlinking (a short window)."""
    if not Path("/proc/self").exists():
        return  # no way to tell a live creator here
    for path in Path(shm_dir()).glob(f"{SHM_PREFIX}*-*-*"):
        pid = path.name[len(SHM_PREFIX):].split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


def wait_until(ready: Callable[[], bool], timeout_s: float, what: Callable[[], str],
               yield_for_s: float = 5e-3, max_nap_s: float | None = 100e-6) -> None:
    """Spin briefly, then yield the core for `yield_for_s`, then sleep in growing naps of
    at most `max_nap_s` (None: keep yielding), until `ready()`. A busy pipeline's waits
    are short and yielding keeps them cheap (a nap costs ~0.1-0.3 ms here); a long wait
    must not hold a core that another stage computes on. TimeoutError names `what()`."""
    for _ in range(_SPIN_BEFORE_YIELD):
        if ready():
            return
    started = time.monotonic()
    nap = 10e-6
    while not ready():
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise TimeoutError(f"{what()} within {timeout_s:.0f} s")
        if max_nap_s is None or waited < yield_for_s:
            os.sched_yield()
        else:
            time.sleep(nap)
            nap = min(2 * nap, max_nap_s)
