"""Shared fixtures: everything a test writes goes under pytest's tmp_path."""

from __future__ import annotations

import os

# Keep BLAS/torch to the 2 cores CI has and avoid oversubscription between processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
