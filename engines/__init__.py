"""Model roles and the backends that run them (see README.md)."""
