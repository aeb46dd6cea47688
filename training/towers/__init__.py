"""Image and text towers (ViT, EfficientNet-Lite0, BERT) with the weight loaders and freezing."""
