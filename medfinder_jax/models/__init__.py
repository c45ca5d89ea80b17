"""Flax modules: 3D ResNet, 3D ViT, BERT, cross-attention fusion and the MedFinder model."""
