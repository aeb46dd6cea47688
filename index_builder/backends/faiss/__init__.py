"""The FAISS backend: versions as files under an index root, searched in this process."""
