"""Handing the process's OpenMP threads to the server's worker thread.

Why: torch runs its CPU kernels on OpenMP, and GNU OpenMP gives every thread that opens a parallel
region a team of its own, whose helper threads stay parked after it. The thread that loads the model
(the main thread) gets such a team; the worker thread, which runs every forward pass, gets a second.
Once the parked and running helpers outnumber the cores, libgomp stops spinning between parallel
regions and puts its threads to sleep instead, and a forward pass is thousands of regions: a
4-row SmolLM2 decoding step on 2 cores took 120-145 ms from a worker thread against 67-77 ms from
the main thread. Releasing the loading thread's team (OpenMP 5's `omp_pause_resource_all`, which
frees only the calling thread's pool) brings the worker back to 82-86 ms.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os

import torch

log = logging.getLogger("prefixtune.server")

_PAUSE_HARD = 2  # omp_pause_hard: free the threads, not just park them
_RUNTIMES = ("libgomp*.so*", "libomp*.so*", "libiomp5*.so*", "libomp*.dylib", "libiomp5*.dylib")


def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded: the copy in its own lib folder (the wheels ship one), else the system's."""
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = [path for pattern in _RUNTIMES for path in sorted(glob.glob(os.path.join(folder, pattern)))]
    for name in [*candidates, "libgomp.so.1"]:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(library, "omp_pause_resource_all"):
            return library
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP team, so that the worker's team is the only one; True when freed.

    Harmless when the calling thread runs torch again: it only builds a new team (and brings the slowdown
    above back while that team exists). Returns False where the runtime lacks the call or refuses it."""
    if not torch.backends.openmp.is_available():
        return False
    library = _runtime()
    if library is None:
        return False
    library.omp_pause_resource_all.argtypes = [ctypes.c_int]
    freed = library.omp_pause_resource_all(_PAUSE_HARD) == 0
    log.debug("released the loading thread's OpenMP threads: %s", freed)
    return freed
