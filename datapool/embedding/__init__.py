"""Turning images into L2-normalised embeddings: the model, its checkpoint, inference."""
