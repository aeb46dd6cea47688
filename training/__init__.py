"""Training half of cots (PyTorch): towers, objectives, trainer, evaluation and export."""
