"""The search service: FastAPI over ONNX Runtime encoders and FAISS indexes (no torch)."""
