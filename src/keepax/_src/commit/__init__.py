"""keepax commit layer."""
