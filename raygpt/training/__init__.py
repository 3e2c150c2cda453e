"""Training: the plain PyTorch loop, its pieces, and the Ray Train edge around it."""
