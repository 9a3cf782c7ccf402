"""The user artifact store: versions the trainer publishes and the orchestrator reads (see README.md)."""
