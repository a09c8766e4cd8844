"""The one thread of a process that runs its networks on the CPU.

libgomp gives every thread that runs parallel torch ops an OpenMP team of its own. Once a
process holds more team threads than it has cores, libgomp stops spinning between parallel
regions and every small op pays a futex wake-up instead. With a model thread per stage (and
loading on the main thread) Karlo's networks ran about 1.5x slower than the same work on one
thread. So engines are loaded on this thread, and every batcher of a CPU engine hands its work
to it; stages in one process then take turns, which costs nothing when they share the cores
anyway. On a GPU each batcher computes on its own thread (kernels run on the device).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def _mark() -> None:
    global _ident
    _ident = threading.get_ident()


def on_compute_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) run on the compute thread (directly when called from it); its result
    or its exception."""
    global _executor
    if threading.get_ident() == _ident:
        return fn(*args, **kwargs)
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unclip-compute", initializer=_mark)
        executor = _executor
    return executor.submit(fn, *args, **kwargs).result()


def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the calling thread (a GPU engine's batcher)."""
    return fn(*args, **kwargs)
