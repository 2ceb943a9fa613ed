"""keepax format layer."""
