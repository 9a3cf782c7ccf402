"""Where roles run: in process with PyTorch, or in a Triton server over gRPC."""
