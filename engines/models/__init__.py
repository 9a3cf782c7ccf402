"""The torch weights of a model family: loading local files, the seeded random families, configs."""
