"""Built-in synthetic tasks (the demo's multi-style arithmetic)."""
