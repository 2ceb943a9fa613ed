"""Everything keepax does across processes: barriers, broadcasts, gathers and agreement.

Multi-host code asks :func:`current` for a :class:`Coordinator` and uses its four
collectives. With one process they are trivial (:class:`SingleProcess`); with several they run
on the JAX distributed runtime's key-value store and barriers (:class:`JaxCoordinator`). This
module is the only place in keepax that touches that private runtime API.

Every collective is called by *every* process, in the *same order*, with the same ``name``
(like a JAX collective). Each call takes the next number of a per-coordinator sequence; its
keys live under ``<namespace>/<seq>/<name>/`` and its barrier is named
``<namespace>/<seq>/<name>``, so no two calls ever share a key or a barrier, and a process
that calls a different collective (a different ``name``) than its peers fails with a timeout
naming it instead of silently exchanging the wrong values.

A call on process ``i`` (a) stores its JSON value under ``<prefix>/<i>``, (b) waits at the
call's barrier, (c) reads what it needs (every value, or the source's), and (d) on process 0,
deletes the keys of the *previous* call. Passing the barrier of call ``k`` proves that every
process has finished call ``k - 1``, reads included, so that deletion is safe. The store
never holds the keys of more than three calls: ``k - 1`` until process 0 deletes them, ``k``,
and ``k + 1`` from processes already past ``k``. Values are small JSON documents
(``json.dumps``); the keys of the last call stay until the runtime shuts down.

Any failure (a timeout, a dead peer, a runtime error) raises :class:`~keepax.errors.KeepaxError`
naming the operation, the step and the path. After such a failure the processes' sequences may
disagree: the coordinator is unusable and the job should stop (and restart). An error reported
through :meth:`Coordinator.agree` is not such a failure; the processes stay in step.

Calls must not be made from several threads at once (they are serialised by a lock, but their
order would differ between processes).
"""

from __future__ import annotations

import abc
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import jax

from keepax.errors import KeepaxError, PeerProcessError

__all__ = ["JSON", "Coordinator", "SingleProcess", "JaxCoordinator", "current"]

JSON: TypeAlias = "None | bool | int | float | str | list[JSON] | dict[str, JSON]"
"""A value ``json.dumps`` accepts and ``json.loads`` returns."""

_T = TypeVar("_T")


def _roundtrip(value: JSON) -> JSON:
    """What another process would receive: tuples become lists, non-JSON values fail here."""
    return json.loads(json.dumps(value))


def _check_call(name: str, timeout: float) -> None:
    if not name or "/" in name:
        raise ValueError(f"collective name {name!r} must be non-empty and contain no '/'")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _cause(error: BaseException) -> str:
    """The first line of a runtime error, without the runtime's generic advice."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = line.split(" This usually happens")[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _processes(indices: Sequence[int], count: int) -> str:
    noun = "process" if len(indices) == 1 else "processes"
    return f"{noun} {', '.join(map(str, indices))} of {count}"


class Coordinator(abc.ABC):
    """The collectives keepax needs across the processes of one job.

    Every method is collective: every process calls it, in the same order, with the same
    ``name``. ``timeout`` is in seconds; ``step`` and ``path`` only label errors.
    """

    @property
    @abc.abstractmethod
    def process_index(self) -> int:
        """This process's index, ``0 <= process_index < process_count``."""

    @property
    @abc.abstractmethod
    def process_count(self) -> int:
        """How many processes take part."""

    @abc.abstractmethod
    def barrier(
        self, name: str, *, timeout: float, step: int | None = None, path: str | None = None
    ) -> None:
        """Returns once every process has called ``barrier(name)``.

        Raises:
          KeepaxError: Some process did not arrive within ``timeout`` (the message names
            them), or a peer died.
        """

    @abc.abstractmethod
    def broadcast(
        self,
        name: str,
        value: JSON = None,
        *,
        timeout: float,
        source: int = 0,
        step: int | None = None,
        path: str | None = None,
    ) -> JSON:
        """Returns process ``source``'s ``value`` on every process (others' are ignored).

        Also a barrier: no process returns before every process has called it.

        Raises:
          KeepaxError: As :meth:`barrier`.
        """

    @abc.abstractmethod
    def all_gather(
        self,
        name: str,
        value: JSON,
        *,
        timeout: float,
        step: int | None = None,
        path: str | None = None,
    ) -> list[JSON]:
        """Returns every process's ``value``, indexed by process; also a barrier.

        Raises:
          KeepaxError: As :meth:`barrier`.
        """

    def agree(
        self,
        name: str,
        error: str | None,
        *,
        timeout: float,
        step: int | None = None,
        path: str | None = None,
    ) -> None:
        """Fails on every process if any process reports an error.

        Each process passes ``None`` (it succeeded) or a description of its failure. This is
        how a failure on one process fails the operation everywhere::

            try:
                write_my_shards()
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            coordinator.agree("write", error, timeout=600, step=step, path=path)

        Raises:
          KeepaxError: On every process, naming each failed process and its message; or as
            :meth:`barrier`.
        """
        if error is not None and not isinstance(error, str):
            raise TypeError(f"error must be a str or None, not {type(error).__name__}")
        errors = self.all_gather(name, error, timeout=timeout, step=step, path=path)
        failed = [(i, e) for i, e in enumerate(errors) if e is not None]
        if failed:
            details = "; ".join(f"process {i}: {e}" for i, e in failed)
            raise KeepaxError(
                f"{name!r} failed on {_processes([i for i, _ in failed], self.process_count)}"
                f" ({details}). See the log of each failed process for the full error.",
                path=path,
                step=step,
            )


class SingleProcess(Coordinator):
    """The coordinator of a job with one process: every collective returns at once."""

    @property
    def process_index(self) -> int:
        return 0

    @property
    def process_count(self) -> int:
        return 1

    def barrier(
        self, name: str, *, timeout: float, step: int | None = None, path: str | None = None
    ) -> None:
        _check_call(name, timeout)

    def broadcast(
        self,
        name: str,
        value: JSON = None,
        *,
        timeout: float,
        source: int = 0,
        step: int | None = None,
        path: str | None = None,
    ) -> JSON:
        _check_call(name, timeout)
        if source != 0:
            raise ValueError(f"source {source} is not a process index (1 process)")
        return _roundtrip(value)

    def all_gather(
        self,
        name: str,
        value: JSON,
        *,
        timeout: float,
        step: int | None = None,
        path: str | None = None,
    ) -> list[JSON]:
        _check_call(name, timeout)
        return [_roundtrip(value)]


class JaxCoordinator(Coordinator):
    """Collectives on the JAX distributed runtime's key-value store and barriers.

    Args:
      client: The runtime's client (``jax._src.distributed.global_state.client``).
      process_index: This process's index.
      process_count: How many processes the runtime connects.
      namespace: The root of every key and barrier name; two coordinators sharing a client
        need different namespaces.
    """

    def __init__(
        self, client: Any, process_index: int, process_count: int, *, namespace: str = "keepax"
    ) -> None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} not in [0, {process_count})")
        self._client = client
        self._index = process_index
        self._count = process_count
        self._namespace = namespace
        self._seq = 0
        self._previous: str | None = None
        self._lock = threading.Lock()

    @property
    def process_index(self) -> int:
        return self._index

    @property
    def process_count(self) -> int:
        return self._count

    @property
    def namespace(self) -> str:
        """The prefix of this coordinator's keys in the runtime's store."""
        return self._namespace

    def barrier(
        self, name: str, *, timeout: float, step: int | None = None, path: str | None = None
    ) -> None:
        self._collective(name, "", timeout, step, path, read=lambda prefix: None)

    def broadcast(
        self,
        name: str,
        value: JSON = None,
        *,
        timeout: float,
        source: int = 0,
        step: int | None = None,
        path: str | None = None,
    ) -> JSON:
        if not 0 <= source < self._count:
            raise ValueError(f"source {source} is not a process index ({self._count} processes)")
        payload = json.dumps(value) if self._index == source else ""
        context = (name, step, path)

        def read(prefix: str) -> JSON:
            key = f"{prefix}/{source}"
            text = self._runtime(context, "read", self._client.key_value_try_get, key)
            return json.loads(text)

        return self._collective(name, payload, timeout, step, path, read=read)

    def all_gather(
        self,
        name: str,
        value: JSON,
        *,
        timeout: float,
        step: int | None = None,
        path: str | None = None,
    ) -> list[JSON]:
        payload = json.dumps(value)
        context = (name, step, path)

        def read(prefix: str) -> list[JSON]:
            entries = self._runtime(context, "read", self._client.key_value_dir_get, f"{prefix}/")
            values = {int(key.rsplit("/", 1)[1]): json.loads(text) for key, text in entries}
            if sorted(values) != list(range(self._count)):
                raise KeepaxError(
                    f"{name!r}: expected values from {self._count} processes, found"
                    f" {sorted(values)}; is another coordinator using namespace"
                    f" {self._namespace!r}?",
                    path=path,
                    step=step,
                )
            return [values[i] for i in range(self._count)]

        return self._collective(name, payload, timeout, step, path, read=read)

    def _collective(
        self,
        name: str,
        payload: str,
        timeout: float,
        step: int | None,
        path: str | None,
        *,
        read: Callable[[str], _T],
    ) -> _T:
        """Stores ``payload`` as this process's value, waits for everyone, reads, cleans up."""
        _check_call(name, timeout)
        context = (name, step, path)
        with self._lock:
            prefix = f"{self._namespace}/{self._seq}/{name}"
            self._seq += 1
            key = f"{prefix}/{self._index}"
            self._runtime(context, "publish", self._client.key_value_set, key, payload)
            began = time.monotonic()
            try:
                self._client.wait_at_barrier(prefix, max(1, int(timeout * 1000)))
            except RuntimeError as e:
                raise self._barrier_error(
                    prefix, timeout, e, context, time.monotonic() - began) from e
            result = read(prefix)
            if self._index == 0 and self._previous is not None:
                self._runtime(context, "clean up", self._client.key_value_delete, self._previous)
            self._previous = prefix
            return result

    def _barrier_error(
        self,
        prefix: str,
        timeout: float,
        error: RuntimeError,
        context: tuple[str, int | None, str | None],
        waited: float,
    ) -> KeepaxError:
        """Explains a failed barrier: which processes never arrived, whether the runtime says
        they died (it lost their heartbeats) or they are late; it never claims what the lookup
        could not learn.

        (The runtime's live-nodes query cannot tell: it blocks until every process it is asked
        about calls it too, so it would wait for the very processes that are late.)
        """
        name, step, path = context
        cause = _cause(error)
        try:
            entries = self._client.key_value_dir_get(f"{prefix}/")
            arrived: set[int] | None = {int(key.rsplit("/", 1)[1]) for key, _ in entries}
        except RuntimeError as e:
            arrived, lookup = None, _cause(e)
        died = "heartbeat" in cause.lower()
        if arrived is None:
            message = (
                f"{name!r} failed on process {self._index} of {self._count} after {waited:.1f} s"
                f" ({cause}); which processes arrived could not be looked up ({lookup})."
                " A peer (process 0 hosts the coordination service) probably died or gave up:"
                " check the logs of every process."
            )
            return KeepaxError(message, path=path, step=step)
        missing = [i for i in range(self._count) if i not in arrived]
        if missing and died:
            message = (
                f"{_processes(missing, self._count)} did not reach {name!r}: the runtime lost"
                f" a process's heartbeats after {waited:.1f} s ({cause}). A process died: check"
                " the logs of those named, and restart the job."
            )
        elif missing:
            message = (
                f"{_processes(missing, self._count)} did not reach {name!r} within {timeout:g} s"
                f" ({cause}). They may be slow, hung or dead: check their logs; if they are"
                " merely slow, raise the timeout."
            )
        elif "DEADLINE_EXCEEDED" in cause:
            message = (
                f"{name!r} timed out on process {self._index} of {self._count} after"
                f" {waited:.1f} s, and every process has arrived by now: some process came"
                f" later than the timeout ({timeout:g} s) allows ({cause}). Check which process"
                " was slow in the logs; raise the timeout if it is merely slow."
            )
        else:
            message = (
                f"{name!r} failed on process {self._index} of {self._count} ({cause}). Another"
                " process probably gave up waiting or died: check the logs of every process."
            )
        return PeerProcessError(message, processes=tuple(missing), path=path, step=step)

    def _runtime(
        self,
        context: tuple[str, int | None, str | None],
        what: str,
        call: Callable[..., _T],
        *args: Any,
    ) -> _T:
        """Calls the runtime, turning its errors into a ``KeepaxError``."""
        try:
            return call(*args)
        except RuntimeError as e:
            name, step, path = context
            cause = _cause(e)
            raise KeepaxError(
                f"{name!r} failed to {what} on process {self._index} of {self._count} ({cause})."
                " A peer may have died or the coordination service may be down: check the logs"
                " of every process.",
                path=path,
                step=step,
            ) from e


_SINGLE = SingleProcess()
_CACHE_LOCK = threading.Lock()
_cache: dict[str, tuple[Any, JaxCoordinator]] = {}


def _runtime_client() -> Any:
    """The JAX distributed runtime's client, or ``None`` (private API: only used here)."""
    from jax._src import distributed

    return distributed.global_state.client


def current(namespace: str = "keepax") -> Coordinator:
    """The coordinator of this job's processes.

    Args:
      namespace: Collectives of different namespaces have separate sequences, so one thread
        may use one namespace while another thread uses another (keepax's saves, which may
        run on a writer thread, use ``"keepax-save"``; the manager's decisions ``"keepax"``).

    Returns:
      :class:`SingleProcess` when ``jax.process_count() == 1``; otherwise the
      :class:`JaxCoordinator` of the current distributed runtime client (one per client, so
      its sequence numbers carry over between calls).

    Raises:
      KeepaxError: Several processes but no distributed runtime client.
    """
    if jax.process_count() == 1:
        return _SINGLE
    client = _runtime_client()
    if client is None:
        raise KeepaxError(
            f"JAX reports {jax.process_count()} processes but its distributed runtime is not"
            " initialised: call jax.distributed.initialize() first."
        )
    with _CACHE_LOCK:
        cached = _cache.get(namespace)
        if cached is None or cached[0] is not client:
            cached = _cache[namespace] = (client, JaxCoordinator(
                client, jax.process_index(), jax.process_count(), namespace=namespace))
        return cached[1]
