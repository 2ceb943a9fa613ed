"""The first import of every child script started by :mod:`multiproc`.

Importing this module (before ``jax``) configures the process from the environment the
harness set, so a child script reads::

    import mp_prelude  # first: sets XLA_FLAGS / JAX_PLATFORMS, installs the excepthook

    index, count = mp_prelude.init()  # jax.distributed.initialize on 127.0.0.1
    ...
    mp_prelude.report({"ok": True})   # read back by the test as ProcessResult.result

On import it

- sets ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=<n>``
  (before anything imports ``jax``);
- installs a ``sys.excepthook`` (and ``threading.excepthook``) that prints the traceback and
  calls ``os._exit(1)``: an uncaught exception otherwise leaves the process blocked in JAX's
  shutdown barrier while its peers hang;
- enables :mod:`faulthandler` (a runtime abort prints the Python stack) and registers it on
  ``SIGUSR1``, which the harness sends to a process that overran its time limit before killing it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV_PORT = "KEEPAX_MP_PORT"
ENV_COUNT = "KEEPAX_MP_COUNT"
ENV_INDEX = "KEEPAX_MP_INDEX"
ENV_DEVICES = "KEEPAX_MP_DEVICES"
ENV_RESULTS = "KEEPAX_MP_RESULTS"

if "jax" in sys.modules:
    raise RuntimeError("import mp_prelude before jax: XLA_FLAGS must be set first")

INDEX = int(os.environ[ENV_INDEX])
COUNT = int(os.environ[ENV_COUNT])
PORT = int(os.environ[ENV_PORT])
DEVICES = int(os.environ.get(ENV_DEVICES, "2"))
RESULTS = Path(os.environ[ENV_RESULTS])

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    traceback.print_exception(kind, value, tb)
    print(f"[mp_prelude] process {INDEX}: uncaught exception, exiting with status 1", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    _excepthook(args.exc_type, args.exc_value or RuntimeError("?"), args.exc_traceback)


sys.excepthook = _excepthook
threading.excepthook = _thread_excepthook
faulthandler.enable()
faulthandler.register(signal.SIGUSR1, all_threads=True)


def init() -> tuple[int, int]:
    """Joins the JAX distributed runtime of this group of processes.

    Returns:
      ``(process_index, process_count)``.
    """
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{PORT}",
        coordinator_bind_address=f"127.0.0.1:{PORT}",
        num_processes=COUNT,
        process_id=INDEX,
        initialization_timeout=30,
        heartbeat_timeout_seconds=int(os.environ.get("KEEPAX_MP_HEARTBEAT", "10")),
        shutdown_timeout_seconds=30,
    )
    assert jax.process_index() == INDEX and jax.process_count() == COUNT
    return INDEX, COUNT


def global_mesh(shape: Sequence[int], names: Sequence[str]) -> Any:
    """A ``jax.sharding.Mesh`` over every process's devices, ordered by device id."""
    import jax
    import numpy as np

    devices = sorted(jax.devices(), key=lambda d: d.id)
    return jax.sharding.Mesh(np.array(devices).reshape(tuple(shape)), tuple(names))


def report(result: Any) -> None:
    """Hands a JSON value back to the test (``ProcessResult.result``); the last call wins."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    final = RESULTS / f"result-{INDEX}.json"
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, final)


def log(*args: Any) -> None:
    """Prints a line prefixed with this process's index, flushed at once."""
    print(f"[{INDEX}]", *args, flush=True)
