"""The checkpoint layer: plan, save, open, restore, inspect and verify one checkpoint.

Modules: ``plan`` (what a tree's leaves are and which chunks this process writes), ``saving``
(checks, then writing and committing through the commit layer), ``opening`` (commit marker and
manifest, read and checked once), ``restoring`` (matching ``like``, reading, placing),
``inspection`` (inspect and verify), ``handle`` (``keepax.open``) and ``single_file``.

Higher layers (the async engine, the manager, the CLI) use only the names re-exported here.
"""

from keepax._src.checkpoint.handle import Checkpoint as Checkpoint
from keepax._src.checkpoint.handle import ChunkInfo as ChunkInfo
from keepax._src.checkpoint.handle import open_checkpoint as open_checkpoint
from keepax._src.checkpoint.handle import restore as restore
from keepax._src.checkpoint.inspection import CheckpointInfo as CheckpointInfo
from keepax._src.checkpoint.inspection import LeafInfo as LeafInfo
from keepax._src.checkpoint.inspection import verify as verify
from keepax._src.checkpoint.per_process import PerProcess as PerProcess
from keepax._src.checkpoint.plan import LeafPlan as LeafPlan
from keepax._src.checkpoint.plan import SourceBuffer as SourceBuffer
from keepax._src.checkpoint.plan import chunk_view as chunk_view
from keepax._src.checkpoint.plan import plan_leaves as plan_leaves
from keepax._src.checkpoint.restoring import RestoreStats as RestoreStats
from keepax._src.checkpoint.restoring import restore_manifest as restore_manifest
from keepax._src.checkpoint.saving import SYNC_TIMEOUT as SYNC_TIMEOUT
from keepax._src.checkpoint.saving import PreparedSave as PreparedSave
from keepax._src.checkpoint.saving import SaveResult as SaveResult
from keepax._src.checkpoint.saving import check_metadata as check_metadata
from keepax._src.checkpoint.saving import prepare_save as prepare_save
from keepax._src.checkpoint.saving import save as save
from keepax._src.checkpoint.saving import write_prepared as write_prepared
from keepax._src.checkpoint.single_file import inspect as inspect
from keepax._src.checkpoint.single_file import load_file as load_file
from keepax._src.checkpoint.single_file import save_file as save_file

__all__ = [
    "Checkpoint", "ChunkInfo", "open_checkpoint", "load_file", "save_file", "CheckpointInfo",
    "LeafInfo", "LeafPlan", "PerProcess", "PreparedSave", "RestoreStats", "SaveResult",
    "SourceBuffer", "SYNC_TIMEOUT",
    "check_metadata", "chunk_view", "inspect", "plan_leaves", "prepare_save", "restore",
    "restore_manifest", "save", "verify", "write_prepared",
]
