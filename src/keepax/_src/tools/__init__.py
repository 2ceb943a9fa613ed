"""Tools over checkpoints, one module each: ``orbax_import`` (import from Orbax), ``export``
(safetensors, npz, HDF5), ``diff``, ``copy``, ``gc``, and ``listing`` (the JSON output and
tables of ``ls``/``show``/``verify``).

Each tool is a plain function (re-exported by ``keepax``) plus, for the CLI, an
``add_<command>_parser(subparsers)`` and a ``run_<command>(args) -> int``. This package
re-exports nothing, so that ``keepax._src.tools.export`` and friends stay the modules.
"""
