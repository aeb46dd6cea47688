"""Importers that turn image-text sources into the manifest format (see index_builder.manifest)."""
