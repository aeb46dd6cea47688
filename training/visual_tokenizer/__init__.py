"""The visual tokenizer for masked vision modelling: the VQ-VAE (`model`), its training and
evaluation on a gallery (`training`) and `cots tokenizer` (`commands`, importable without
torch, so nothing is imported here)."""
