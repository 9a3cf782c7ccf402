"""The denoising pass over the engines: schedulers and the inpainting loop (see README.md)."""
