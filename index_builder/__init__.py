"""Torch-free half of cots: datasets, preprocessing, bundles, encoders and FAISS indexes."""
