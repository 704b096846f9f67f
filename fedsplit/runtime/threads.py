"""Threads that compute with the process's intra-op thread count.

``torch.set_num_threads`` sets the count for the calling thread's OpenMP parallel regions and
for threads OpenMP starts later, but a thread started by Python or a library keeps OpenMP's
default (the number of cores) until it sets its own; MKL then blocks some matrix products
differently on it (a (9, 64) x (64, 64) product differs in its last bits), so results would
depend on which thread ran a call. Every thread the runtime starts begins with
:func:`align_threads`; worker processes also get ``OMP_NUM_THREADS`` for the threads others
start (gRPC's).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def align_threads() -> None:
    """Make this thread compute with the process's intra-op thread count."""
    torch.set_num_threads(torch.get_num_threads())


def compute_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads compute like the thread that set the process's count."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=align_threads)
