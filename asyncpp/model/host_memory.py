"""The KV pool's memory on a CPU: resident from the start, in 2 MiB transparent huge pages
where the kernel allows.

Untouched, the pool's pages would be faulted in as sequences first write them, so a stage's
memory would grow under load for minutes (by the whole pool) and its size be known only
then; touched at start it is known up front, as vLLM's on a GPU. The compiled decode kernel
reads KV blocks scattered over the pool: with 4 KiB pages each block costs TLB misses that
2 MiB pages mostly avoid. So the pool is an anonymous private mapping, advised
MADV_HUGEPAGE (honoured with THP set to "always" or "madvise"), aligned to 2 MiB and
populated at once; where any of that is unavailable it is a plain zeroed tensor. The tensor holds the
mapping (torch.frombuffer keeps its buffer alive): it is unmapped when the last view goes."""
from __future__ import annotations

import ctypes
import math
import mmap

import torch

HUGE_PAGE = 2 * 2**20
MADV_POPULATE_WRITE = 23  # linux/mman.h; Python 3.11's mmap module does not name it


def resident_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose pages are all resident now (huge pages where possible)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    try:
        buffer = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):  # no anonymous mmap here
        return torch.zeros(shape, dtype=dtype)
    offset = -_address(buffer) % HUGE_PAGE  # a multiple of the page size: the mapping is page aligned
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except (OSError, ValueError, AttributeError):  # THP off, or no madvise: 4 KiB pages
        pass
    tensor = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset).view(shape)
    try:  # the kernel faults every page in, zeroed (Linux 5.14+): a third of the time of writing zeros
        buffer.madvise(getattr(mmap, "MADV_POPULATE_WRITE", MADV_POPULATE_WRITE), offset, nbytes)
    except (OSError, ValueError):
        tensor.zero_()  # the same, by writing
    return tensor


def _address(buffer: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # releases the export
