"""Leases: a running job (or shard) renews its hold on its row in the background; when a renewal
fails (cancelled, or requeued after a lost heartbeat) the work stops at its next check."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class JobStopped(Exception):  # noqa: N818 - a signal, not an error
    """The job was cancelled, or another attempt owns it now: stop without writing anything."""


class Lease:
    """Renews a lease every ``interval_s`` with ``renew`` (a fenced write that returns whether
    it landed) until the ``with`` block ends."""

    def __init__(self, renew: Callable[[], bool], interval_s: float, what: str) -> None:
        self.renew, self.interval_s, self.what = renew, interval_s, what
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {what}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.renew():
                    self.lost = True
                    log.warning("%s: lease lost (cancelled or taken over); stopping", self.what)
                    return
            except Exception:  # a database hiccup: keep the lease, try again next interval
                log.exception("%s: could not renew the lease", self.what)

    def check(self) -> None:
        """Raise ``JobStopped`` if the lease is gone; call between units of work."""
        if self.lost:
            raise JobStopped(self.what)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
