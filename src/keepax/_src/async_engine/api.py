"""``keepax.save_async`` on a process-wide engine, and the exit hook that waits for pending
saves of every engine."""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see end)
import logging
import threading
from typing import Any

from keepax._src import checkpoint
from keepax._src.async_engine.engine import SaveEngine, all_engines, check_limits
from keepax._src.async_engine.records import SaveHandle

__all__ = ["save_async", "default_engine"]

logger = logging.getLogger("keepax")

_default_engine: SaveEngine | None = None
_default_lock = threading.Lock()


def default_engine(create: bool = True) -> SaveEngine | None:
    """The engine :func:`save_async` uses (made on first use; None if ``create`` is false
    and no save was made yet)."""
    global _default_engine
    with _default_lock:
        if _default_engine is None and create:
            _default_engine = SaveEngine("save_async")
        return _default_engine


def save_async(
    path: str,
    tree: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_in_flight: int = 1,
    staging_budget_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout: float = checkpoint.SYNC_TIMEOUT,
    compression: str | tuple[str, int] | None = None,
    dtype: Any = None,
) -> SaveHandle:
    """Saves a pytree as :func:`keepax.save` does, returning once the state is staged.

    When it returns, the caller may donate (``jax.jit(..., donate_argnums=...)``), delete or
    mutate its arrays: what is written is the state at the call. Writing and the commit go on
    in the background; ``handle.wait()`` blocks until committed.

    Args:
      path: The checkpoint directory to create (local path or ``memory://store/name``).
      tree: Any pytree :func:`keepax.save` accepts.
      metadata: JSON-serialisable user metadata.
      overwrite: Replace an existing checkpoint at ``path`` (atomically).
      max_in_flight: At most this many ``save_async`` saves staged or being written; the call
        waits for earlier ones to finish first (the wait is logged and in the record).
      staging_budget_bytes: At most this many bytes staged and not yet written (None: no
        limit beyond ``max_in_flight`` copies of the state). Beyond it, staging streams: the
        call blocks until earlier bytes are written, trading blocking time for memory.
      storage_options: For URLs such as ``s3://bucket/ckpt``: as for :func:`keepax.save`.
      timeout: In a multi-process run, seconds each process waits for the others at each
        stage (the agreement made before this call returns, the data written, the commit).
      compression: ``"zstd"`` or ``("zstd", level)``: as for :func:`keepax.save`.
      dtype: Store floating-point arrays as this dtype: as for :func:`keepax.save`.

    Returns:
      The save's :class:`SaveHandle`.

    Raises:
      KeepaxError: An earlier ``save_async`` failed in the background and its handle's
        ``wait()`` was never called (raised once; this save is not started).
      CheckpointExistsError, UnsupportedLeafError, KeepaxError: as :func:`keepax.save`, for
        what can be checked before writing.
    """
    check_limits(max_in_flight, staging_budget_bytes)
    engine = default_engine()
    assert engine is not None
    engine.check_errors()
    return engine.save(
        lambda: checkpoint.prepare_save(path, tree, metadata=metadata, overwrite=overwrite,
                                        storage_options=storage_options, timeout=timeout,
                                        compression=compression, dtype=dtype),
        path=str(path),
        max_in_flight=max_in_flight,
        staging_budget_bytes=staging_budget_bytes,
        check=engine.check_errors,
    )


def _wait_at_exit() -> None:
    """Interpreter exit waits for pending saves (failures are logged as they happen)."""
    for engine in all_engines():
        try:
            engine.wait()
        except Exception:  # noqa: BLE001 - never let one engine keep the others waiting
            logger.exception("keepax: waiting for pending saves at exit failed")


# Registered with threading's exit hooks (run before concurrent.futures stops accepting work,
# which the writer needs), else with atexit.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_wait_at_exit)
else:  # pragma: no cover - Python without threading._register_atexit
    import atexit

    atexit.register(_wait_at_exit)
