"""The ``keepax`` command line: look inside, check, compare, copy, clean, import and export
checkpoints.

Commands:
  ``keepax ls DIR``             the steps of a CheckpointManager directory: step, time, size, one
                                column per metric (the best step marked), temporary or not.
  ``keepax show PATH``          the tree: every leaf's type, shape, dtype and size, plus totals.
  ``keepax verify PATH``        re-read every chunk and check its checksum; exit 1 naming bad
                                chunks.
  ``keepax diff A B``           leaves added, removed, changed, equal or not; exit 1 if different.
  ``keepax cp SRC DST``         copy a checkpoint (or a whole run with ``--all-steps``) between
                                storages, verifying every chunk, committing last.
  ``keepax gc DIR``             what a manager would clean (dry run; ``--apply`` removes it).
  ``keepax export PATH OUT``    to Hugging Face safetensors (dotted names, index), npz or HDF5.
  ``keepax import-orbax SRC DST``  an Orbax checkpoint or run directory into keepax.

``ls``, ``show``, ``verify``, ``diff`` and ``gc`` take ``--json``. Long work shows a progress bar
on a terminal (``-q`` turns it off; nothing on a pipe).

Paths may be object store URLs (``s3://bucket/run/step``, ``gs://...``). Credentials and
endpoints come from the usual places (for S3: ``AWS_*`` environment variables such as
``AWS_ENDPOINT_URL``, ``~/.aws``), or from ``-o/--storage-option KEY=VALUE`` (repeatable; a
dotted key nests, e.g. ``client_kwargs.endpoint_url=http://127.0.0.1:9000``; a value that
parses as JSON is taken as such, e.g. ``keepax_max_attempts=8`` or ``anon=true``).

Exit status: 0 on success, 1 when ``verify`` finds damage or ``diff`` a difference, 2 when a
checkpoint cannot be opened (missing, incomplete, unreadable) or the command fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keepax._src.tools import copy, diff, export, gc, listing, orbax_import

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="keepax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (listing.add_ls_parser, listing.add_show_parser, listing.add_verify_parser,
                diff.add_diff_parser, copy.add_copy_parser, gc.add_gc_parser,
                export.add_export_parser, orbax_import.add_import_orbax_parser):
        add(commands)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
