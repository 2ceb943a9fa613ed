"""The async engine layer: saves staged in the caller's thread, written and committed by a
background writer, with bounded host memory and failures that are never lost.

Modules, lowest first: ``records`` (:class:`SaveRecord`, :class:`SaveHandle`, background
errors), ``staging`` (host and device copies, the staging budget), ``job`` (one save: chunk
sources over staged copies, the write, how it finished), ``engine`` (:class:`SaveEngine`: the
in-flight limit, the writer thread, unseen failures), ``api`` (:func:`save_async` and the
exit hook). Higher layers (the manager, ``keepax/__init__``) use only the names re-exported
here.
"""

from keepax._src.async_engine.api import save_async as save_async
from keepax._src.async_engine.engine import SaveEngine as SaveEngine
from keepax._src.async_engine.engine import check_limits as check_limits
from keepax._src.async_engine.engine import wait_for as wait_for
from keepax._src.async_engine.records import SaveHandle as SaveHandle
from keepax._src.async_engine.records import SaveRecord as SaveRecord

__all__ = ["SaveEngine", "SaveHandle", "SaveRecord", "check_limits", "save_async", "wait_for"]
