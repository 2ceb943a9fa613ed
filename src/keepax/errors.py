"""The errors keepax raises.

Every error is a :class:`KeepaxError`. Each carries the checkpoint ``path``, the ``step``
(when a manager is involved) and the ``leaf`` key path (when one leaf is at fault), and its
message says what to do next. Several subclasses also derive from the matching built-in
exception (``FileNotFoundError``, ``ValueError``, ``TypeError``), so existing ``except``
clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "KeepaxError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "NotCommittedError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "TreeMismatchError",
    "UnsupportedLeafError",
    "PolicyError",
    "InvalidPathError",
    "DirectoryLockedError",
    "PeerProcessError",
    "StepOrderError",
    "ManagerClosedError",
    "KeepaxWarning",
]


class KeepaxError(Exception):
    """Base class of every error keepax raises.

    Attributes:
      path: The checkpoint path or URL concerned, if any.
      step: The step concerned, if any.
      leaf: The key path of the leaf concerned (as ``jax.tree_util.keystr`` prints it), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        step: int | None = None,
        leaf: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.step = step
        self.leaf = leaf

    def __str__(self) -> str:
        # Built when shown, so context set after construction (``e.step = 5`` by a caller
        # that knows the step) reaches the message.
        context = []
        if self.path is not None:
            context.append(f"checkpoint {self.path!s}")
        if self.step is not None:
            context.append(f"step {self.step}")
        if self.leaf is not None:
            context.append(f"leaf {self.leaf}")
        prefix = f"[{', '.join(context)}] " if context else ""
        return prefix + self.message


class CheckpointNotFoundError(KeepaxError, FileNotFoundError):
    """No checkpoint (committed or not) exists at the path."""


class CheckpointExistsError(KeepaxError, FileExistsError):
    """A checkpoint already exists where a new one was to be written."""


class NotCommittedError(KeepaxError):
    """The path holds a checkpoint whose save never finished (no commit marker)."""


class CorruptCheckpointError(KeepaxError):
    """Bytes on storage do not match what the manifest promises (checksum, size, JSON)."""


class FormatVersionError(KeepaxError):
    """The checkpoint was written in a format version this keepax cannot read."""


class TreeMismatchError(KeepaxError, ValueError):
    """The checkpoint's tree does not match the ``like`` tree (missing, extra, shape, dtype)."""


class UnsupportedLeafError(KeepaxError, TypeError):
    """A leaf of the tree to save has a type keepax does not store."""


class PolicyError(KeepaxError, ValueError):
    """A save or retention policy, or a manager option, is invalid (raised at construction)."""


class InvalidPathError(KeepaxError, ValueError):
    """A path or URL keepax cannot store to (an unknown scheme, a malformed URL)."""


class DirectoryLockedError(KeepaxError):
    """Another live manager (this or another process on this host) holds the directory's lock."""


class PeerProcessError(KeepaxError):
    """Another process of a multi-process save failed, died or did not arrive in time.

    Attributes:
      processes: The indices of the processes concerned.
    """

    def __init__(
        self,
        message: str,
        *,
        processes: tuple[int, ...] = (),
        path: str | None = None,
        step: int | None = None,
        leaf: str | None = None,
    ) -> None:
        super().__init__(message, path=path, step=step, leaf=leaf)
        self.processes = tuple(processes)


class StepOrderError(KeepaxError, ValueError):
    """A manager was asked to save a step at or below one it already holds."""


class ManagerClosedError(KeepaxError):
    """A method was called on a closed :class:`~keepax.CheckpointManager`."""


class KeepaxWarning(UserWarning):
    """Something keepax skipped or repaired rather than failed on, e.g. a foreign file or a
    corrupt step in a manager's directory (left untouched), or a stale lock taken over."""
