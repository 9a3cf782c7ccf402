"""Pure image and face geometry shared by every package (see README.md)."""
