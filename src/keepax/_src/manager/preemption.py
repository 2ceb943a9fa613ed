"""Preemption: a SIGTERM (or SIGINT) asks the run to save at its next step and stop.

The signal handlers only set a flag; they hold no manager, so a manager dropped unclosed can
still be collected. The manager reads the flag when it decides whether to save.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from keepax.errors import PolicyError

__all__ = ["Preemption"]


class Preemption:
    """Whether a preemption signal arrived, and at which step it was answered by a save.

    Attributes:
      signaled: A signal arrived (or :meth:`notify` was called).
      saved_at: The step of the first save decided after the signal, or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signaled = False
        self.saved_at: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        """A signal arrived and no save has answered it yet."""
        return self.signaled and self.saved_at is None

    def notify(self) -> None:
        """Acts as if a signal had arrived."""
        self.signaled = True

    def install(self) -> None:
        """Installs the handlers (main thread only).

        Raises:
          PolicyError: Called outside the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            raise PolicyError(
                "preemption=True installs SIGTERM/SIGINT handlers, which Python allows only in "
                "the main thread; build the manager there, or call notify_preemption() from "
                "your own handler."
            )
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signaled:
            # A second Ctrl-C: stop now, as without the handler.
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        self.signaled = True

    def uninstall(self) -> None:
        """Restores the previous handlers (where ours are still installed)."""
        previous, self._previous = self._previous, {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
