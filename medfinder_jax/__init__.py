"""MedFinder-JAX: 3D CT text-image retrieval (BIMCV-R / MedFinder) in JAX/Flax."""
