"""Tools over checkpoints: import from Orbax, export (safetensors, npz, HDF5), diff, copy, gc,
and the JSON output of the CLI's listings.

Each tool is a plain function (re-exported by ``keepax``) plus, for the CLI, an
``add_<command>_parser(subparsers)`` and a ``run_<command>(args) -> int``.
"""

from keepax._src.tools.copy import CopyResult as CopyResult
from keepax._src.tools.copy import copy as copy
from keepax._src.tools.diff import DiffResult as DiffResult
from keepax._src.tools.diff import LeafDiff as LeafDiff
from keepax._src.tools.diff import diff as diff
from keepax._src.tools.export import ExportResult as ExportResult
from keepax._src.tools.export import export as export
from keepax._src.tools.gc import GcItem as GcItem
from keepax._src.tools.gc import GcResult as GcResult
from keepax._src.tools.gc import gc as gc
from keepax._src.tools.orbax_import import ImportResult as ImportResult
from keepax._src.tools.orbax_import import import_orbax as import_orbax
from keepax._src.tools.orbax_import import looks_like_orbax_dir as looks_like_orbax_dir
from keepax._src.tools.orbax_import import orbax_directory_error as orbax_directory_error

__all__ = [
    "copy", "CopyResult", "diff", "DiffResult", "LeafDiff", "export", "ExportResult", "gc",
    "GcItem", "GcResult", "import_orbax", "ImportResult", "looks_like_orbax_dir",
    "orbax_directory_error",
]
