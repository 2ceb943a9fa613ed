"""What an asynchronous save reports: its :class:`SaveRecord`, its :class:`SaveHandle`, and
the error a background failure raises later (:func:`background_error`)."""

from __future__ import annotations

import dataclasses
import threading

from keepax._src.util import format_bytes
from keepax.errors import KeepaxError, PeerProcessError

__all__ = ["SaveRecord", "SaveHandle", "background_error"]


@dataclasses.dataclass(frozen=True)
class SaveRecord:
    """What one save did and how long it took (logged at INFO on the ``"keepax"`` logger).

    Attributes:
      path: The checkpoint's path or URL.
      step: The manager's step, or None for :func:`keepax.save_async`.
      blocking_seconds: How long the save call held the caller (waiting included).
      wait_seconds: Part of it spent waiting because ``max_in_flight`` saves were in flight.
      budget_wait_seconds: Part of it spent waiting for earlier staged bytes to be written
        (staging beyond ``staging_budget_bytes`` streams).
      staging_bytes: Bytes staged: copied, or (computed CPU ``jax.Array``s) held through a
        view that donation and deletion cannot change (0 for a synchronous save).
      write_seconds: From the start of writing to the commit (None until finished).
      bytes_written: Bytes of data files, manifest and commit marker (None unless committed).
      committed: Whether the checkpoint was committed.
      error: Why it failed, if it did.
    """

    path: str
    step: int | None
    blocking_seconds: float
    wait_seconds: float
    budget_wait_seconds: float
    staging_bytes: int
    write_seconds: float | None = None
    bytes_written: int | None = None
    committed: bool = False
    error: str | None = None

    @property
    def throughput(self) -> float | None:
        """Bytes written per second of writing (None until committed)."""
        if not self.committed or not self.write_seconds or self.bytes_written is None:
            return None
        return self.bytes_written / self.write_seconds

    def describe(self) -> str:
        """One line, as logged."""
        what = f"step {self.step} ({self.path})" if self.step is not None else self.path
        text = (f"{what}: blocked {self.blocking_seconds:.3f}s (waited "
                f"{self.wait_seconds:.3f}s for saves in flight, {self.budget_wait_seconds:.3f}s "
                f"for the staging budget), staged {format_bytes(self.staging_bytes)}")
        if self.committed:
            rate = self.throughput
            text += (f", wrote {format_bytes(self.bytes_written or 0)} in "
                     f"{self.write_seconds:.3f}s"
                     + (f" ({format_bytes(rate)}/s)" if rate else "") + ", committed")
        elif self.error is not None:
            text += f", FAILED: {self.error}"
        return text


class SaveHandle:
    """One save in progress: *staged* (the caller may reuse, donate or delete its buffers) and
    then *committed* (durable and visible).

    ``keepax.save_async`` returns it once the state is staged, so :attr:`staged` is always
    true for a handle you hold; :meth:`wait` blocks until committed.

    Attributes:
      path: The checkpoint's path or URL.
      step: The manager's step, or None.
    """

    def __init__(self, path: str, step: int | None) -> None:
        self.path = path
        self.step = step
        # Set by the engine (keepax._src.async_engine), never by callers.
        self._staged = False
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._observed = False
        self._committed = False
        self._record: SaveRecord | None = None

    @property
    def staged(self) -> bool:
        """Whether the state is staged: later changes to the caller's arrays cannot change
        what is written."""
        return self._staged

    @property
    def committed(self) -> bool:
        """Whether the checkpoint is committed (durable and visible)."""
        return self._committed

    def done(self) -> bool:
        """Whether the save finished (committed, or failed)."""
        return self._done.is_set()

    @property
    def record(self) -> SaveRecord | None:
        """What the save did so far (complete once :meth:`done`); None until staged."""
        return self._record

    def wait(self, timeout: float | None = None) -> SaveRecord:
        """Blocks until the save is committed; returns its record.

        Raises:
          TimeoutError: ``timeout`` seconds passed first (the save goes on).
          KeepaxError: The save failed in the background (naming the path and step; the
            original exception is the ``__cause__``). Nothing was committed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the save of {self._what()} did not finish within {timeout}s")
        if self._error is not None:
            self._observed = True
            raise self._error
        assert self._record is not None
        return self._record

    def exception(self) -> BaseException | None:
        """The failure of a finished save (marked as seen), or None."""
        if self._error is not None:
            self._observed = True
        return self._error

    def _what(self) -> str:
        return f"step {self.step} ({self.path})" if self.step is not None else self.path

    def __repr__(self) -> str:
        state = ("committed" if self._committed else "failed" if self._error is not None
                 else "staged" if self._staged else "staging")
        return f"SaveHandle({self._what()}: {state})"


def background_error(e: BaseException, path: str, step: int | None, committed: bool
                     ) -> KeepaxError:
    """The error a failed background save raises later: the original type where it is a
    keepax error, always naming the path and step, with the original as ``__cause__``."""
    if committed:
        message = (f"the step was committed, but the manager could not record it "
                   f"({type(e).__name__}: {e}); reload() to see it")
    else:
        message = (f"saving failed in the background, so nothing was committed "
                   f"({type(e).__name__}: {e}); fix the cause and save again")
    cls = type(e) if isinstance(e, KeepaxError) else KeepaxError
    try:
        error = cls(message, path=path, step=step, leaf=getattr(e, "leaf", None))
    except TypeError:  # a subclass with another constructor
        error = KeepaxError(message, path=path, step=step)
    if isinstance(e, PeerProcessError) and isinstance(error, PeerProcessError):
        error.processes = e.processes
    error.__cause__ = e
    return error
