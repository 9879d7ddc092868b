"""A worker's word to its pool processes that it is stopping and wants its fine-tunes back.

Celery's warm shutdown runs in the worker's main process; the job runs in a pool process forked
from it, which hears nothing of it and would train to the end. The main process writes one byte
of memory mapped before the pool forks (every pool process, later ones included, shares it), and
a fine-tune reads it at the end of each step.
"""

from __future__ import annotations

import mmap

# Anonymous and shared: a process forked after this module's import sees the main process's
# writes. Created in every process that imports it; only a worker's main process writes it.
_FLAG = mmap.mmap(-1, 1)


def ask_for_hand_back() -> None:
    """From the worker's main process (a signal handler: no locks, no logging)."""
    _FLAG[0] = 1


def hand_back_asked() -> bool:
    """Whether this process's worker is stopping and wants its running fine-tunes back."""
    return _FLAG[0] == 1
