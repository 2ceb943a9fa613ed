"""A restore's deadline (``timeout=`` on :func:`keepax.restore`): the storage reads of a
restore run on a helper thread while the caller waits at most until the deadline.

A restore makes no collective (every process reads what it needs on its own), so the only
waits it can get stuck in are storage reads: a stalled network mount or object store answers
late or never, and a blocked read cannot be interrupted. With a deadline, the caller stops
waiting when it passes and raises :class:`~keepax.errors.KeepaxError`, naming the
checkpoint and the phase; the abandoned reads finish or fail in the background (a daemon
thread, never joined at exit), and their results are dropped. Placing arrays on devices and
the caller's ``transform`` stay in the caller's thread (JAX's thread-local settings, such as
a default device, apply as without a deadline).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from keepax.errors import KeepaxError

__all__ = ["Deadline"]

_T = TypeVar("_T")


class Deadline:
    """When a restore must be done by (or never, with ``timeout=None``).

    Args:
      timeout: Seconds from now, or None (no deadline).
      where: The checkpoint's path, for errors.

    Raises:
      KeepaxError: ``timeout`` is neither None nor a positive number of seconds.
    """

    def __init__(self, timeout: float | None, where: str) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            raise KeepaxError(f"timeout must be None or a positive number of seconds, not "
                              f"{timeout!r}", path=where)
        self.timeout = timeout
        self.where = where
        self._end = None if timeout is None else time.monotonic() + timeout

    def run(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` (storage reads only), or a :class:`KeepaxError` once the deadline
        passes before it returns; ``what`` names the phase (e.g. ``"reading the data"``)."""
        if self._end is None:
            return fn()
        left = self._end - time.monotonic()
        if left <= 0:
            raise self._error(what)
        box: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=call, name="keepax-restore-read", daemon=True).start()
        if not done.wait(left):
            raise self._error(what)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _error(self, what: str) -> KeepaxError:
        return KeepaxError(
            f"the restore did not finish {what} within timeout={self.timeout:g} s: the "
            "storage stalled or is slower than the timeout allows. Nothing was restored (the "
            "reads under way are abandoned). Check the storage (network, mount, object store "
            "endpoint) and restore again, or raise the timeout for a checkpoint this large",
            path=self.where)
