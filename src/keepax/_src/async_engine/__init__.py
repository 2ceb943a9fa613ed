"""keepax async_engine layer."""
