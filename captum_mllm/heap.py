"""Keep freed memory in the process while an explanation runs (Linux, glibc).

Each batched forward allocates its activations afresh, and glibc's ``free``
hands large blocks back to the kernel at once: blocks above its mmap
threshold are unmapped, and the top of the heap is trimmed past its trim
threshold. The next forward then touches the same amount of new memory, one
page fault per 4 KiB page. On the tiny LFM2-Audio benchmark that was about
10,000 faults and 10-13 ms of kernel time in an explanation of about 45 ms
(``benchmarks/lfm2_audio.py`` prints both).
:func:`retained_heap` raises both thresholds while it is entered, so freed
blocks are reused, and lowers them when it exits. Memory freed meanwhile stays
with the process for the next explanation, as PyTorch's CUDA caching
allocator keeps GPU memory; :func:`release_heap` gives it back, as
``torch.cuda.empty_cache()`` does there. Values do not change: only where
tensors live does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap while entered (each forward's
#: activations, logits included, are reused rather than mapped afresh).
MMAP_THRESHOLD = 256 << 20
#: Freed memory kept at the top of the heap while entered.
TRIM_THRESHOLD = 512 << 20
# Where glibc's own dynamic thresholds settle once large blocks have been
# freed (its ceiling on 64-bit systems): what exit sets back, since glibc has
# no way to read the previous values.
_SETTLED_MMAP_THRESHOLD = 32 << 20
_SETTLED_TRIM_THRESHOLD = 64 << 20
#: Set to "0" to leave the allocator alone.
ENV_SWITCH = "CAPTUM_MLLM_RETAIN_HEAP"

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """glibc, unless it is not the C library or the user tuned its allocator."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or (
        "malloc" in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return None  # the user's own settings win
    return _libc()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # once: platform.libc_ver reads the interpreter's binary
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def heap_retained() -> bool:
    """Whether a :func:`retained_heap` is entered in this process now."""
    return _depth > 0


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Reuse freed memory instead of returning it to the kernel, until exit.

    :class:`~captum_mllm.MultimodalLLMAttribution` enters it for every
    ``attribute`` call; use it around your own loops of forwards. On exit
    glibc's thresholds are set to where its own adjustment settles (32 MiB and
    64 MiB); the memory freed inside stays with the process, for the next
    explanation to reuse, until :func:`release_heap`. It does nothing on
    other C libraries, when ``MALLOC_*_`` or ``GLIBC_TUNABLES`` malloc
    settings are present (yours win), or with ``CAPTUM_MLLM_RETAIN_HEAP=0``.
    Process-wide; nested and concurrent entries are counted.

    Examples::

        >>> with retained_heap():
        ...     for batch in batches:
        ...         model(batch)
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)


def release_heap() -> None:
    """Give the process's freed heap memory back to the kernel (glibc's
    ``malloc_trim``), as ``torch.cuda.empty_cache()`` does for GPU memory: the
    memory :func:`retained_heap` kept for the next explanation, say before a
    long pause. Does nothing where :func:`retained_heap` does nothing.

    Examples::

        >>> res = attr.attribute(inp, n_samples=64)
        >>> release_heap()
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
