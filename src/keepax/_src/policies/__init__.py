"""Pure policies: when to save (``save``), what to keep (``keep``), and their JSON
configuration (``config``). Re-exported by :mod:`keepax.policies`."""
