"""The Milvus backend: versions as collections in a Milvus server, an alias names the current."""
