"""The checkpoint layer: plan, save, open, restore, inspect and verify one checkpoint.

Higher layers (the async engine, the manager, the CLI) use only the names re-exported here.
"""

from keepax._src.checkpoint.handle import Checkpoint as Checkpoint
from keepax._src.checkpoint.handle import ChunkInfo as ChunkInfo
from keepax._src.checkpoint.handle import open_checkpoint as open_checkpoint
from keepax._src.checkpoint.single_file import load_file as load_file
from keepax._src.checkpoint.single_file import save_file as save_file
from keepax._src.checkpoint.snapshot import CheckpointInfo as CheckpointInfo
from keepax._src.checkpoint.snapshot import LeafInfo as LeafInfo
from keepax._src.checkpoint.snapshot import LeafPlan as LeafPlan
from keepax._src.checkpoint.snapshot import PreparedSave as PreparedSave
from keepax._src.checkpoint.snapshot import RestoreStats as RestoreStats
from keepax._src.checkpoint.snapshot import SaveResult as SaveResult
from keepax._src.checkpoint.snapshot import SourceBuffer as SourceBuffer
from keepax._src.checkpoint.snapshot import check_metadata as check_metadata
from keepax._src.checkpoint.snapshot import chunk_view as chunk_view
from keepax._src.checkpoint.snapshot import inspect as inspect
from keepax._src.checkpoint.snapshot import plan_leaves as plan_leaves
from keepax._src.checkpoint.snapshot import prepare_save as prepare_save
from keepax._src.checkpoint.snapshot import restore as restore
from keepax._src.checkpoint.snapshot import restore_manifest as restore_manifest
from keepax._src.checkpoint.snapshot import save as save
from keepax._src.checkpoint.snapshot import verify as verify
from keepax._src.checkpoint.snapshot import write_prepared as write_prepared

__all__ = [
    "Checkpoint", "ChunkInfo", "open_checkpoint", "load_file", "save_file", "CheckpointInfo",
    "LeafInfo", "LeafPlan", "PreparedSave", "RestoreStats", "SaveResult", "SourceBuffer",
    "check_metadata", "chunk_view", "inspect", "plan_leaves", "prepare_save", "restore",
    "restore_manifest", "save", "verify", "write_prepared",
]
