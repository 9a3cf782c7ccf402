"""Role descriptions: every tensor of every model role declared once (see engines/README.md)."""
