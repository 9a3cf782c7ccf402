"""The easyphoto command line."""
