"""keepax: fast, safe, documented checkpoints for JAX pytrees.

The public surface is what this module re-exports; everything under ``keepax._src`` is
private.
"""

from keepax import errors as errors
from keepax import policies as policies
from keepax._src.async_engine import SaveHandle as SaveHandle
from keepax._src.async_engine import SaveRecord as SaveRecord
from keepax._src.async_engine import save_async as save_async
from keepax._src.checkpoint import Checkpoint as Checkpoint
from keepax._src.checkpoint import CheckpointInfo as CheckpointInfo
from keepax._src.checkpoint import ChunkInfo as ChunkInfo
from keepax._src.checkpoint import LeafInfo as LeafInfo
from keepax._src.checkpoint import PerProcess as PerProcess
from keepax._src.checkpoint import RestoreStats as RestoreStats
from keepax._src.checkpoint import SaveResult as SaveResult
from keepax._src.checkpoint import inspect as inspect
from keepax._src.checkpoint import load_file as load_file
from keepax._src.checkpoint import open_checkpoint as open
from keepax._src.checkpoint import restore as restore
from keepax._src.checkpoint import save as save
from keepax._src.checkpoint import save_file as save_file
from keepax._src.checkpoint import verify as verify
from keepax._src.format import spec as _spec
from keepax._src.manager.manager import CheckpointManager as CheckpointManager
from keepax._src.manager.manager import StepInfo as StepInfo
from keepax._src.tools.copy import copy as copy
from keepax._src.tools.diff import diff as diff
from keepax._src.tools.export import export as export
from keepax._src.tools.gc import gc as gc
from keepax._src.tools.orbax_import import import_orbax as import_orbax
from keepax.errors import KeepaxError as KeepaxError
from keepax.errors import KeepaxWarning as KeepaxWarning

__version__ = _spec.KEEPAX_VERSION  # one place: keepax/_src/format/spec.py

__all__ = [
    "errors",
    "policies",
    "save",
    "save_async",
    "restore",
    "inspect",
    "verify",
    "open",
    "Checkpoint",
    "ChunkInfo",
    "copy",
    "diff",
    "export",
    "gc",
    "import_orbax",
    "CheckpointManager",
    "StepInfo",
    "save_file",
    "load_file",
    "CheckpointInfo",
    "LeafInfo",
    "PerProcess",
    "RestoreStats",
    "SaveResult",
    "SaveHandle",
    "SaveRecord",
    "KeepaxError",
    "KeepaxWarning",
]
