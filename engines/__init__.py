"""Model roles, their descriptions and the backends that run them (see README.md)."""
