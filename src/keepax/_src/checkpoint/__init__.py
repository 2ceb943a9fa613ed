"""keepax checkpoint layer."""
