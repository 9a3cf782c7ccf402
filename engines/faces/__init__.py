"""The face stack: detection with 5 landmarks, identity embeddings, behind engine roles."""
