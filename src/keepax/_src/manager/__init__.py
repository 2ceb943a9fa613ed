"""keepax manager layer."""
