#!/usr/bin/env bash
# The main job on a fresh Debian machine: install cots (torch CPU wheel, no GPU needed), build
# the Open Clip Art gallery, train the default CPU recipe, evaluate, export the ONNX bundle,
# build the FAISS index and serve search on http://127.0.0.1:8000 (Ctrl-C stops the server).
# Rerunning reuses every finished stage. Extra arguments go to `cots demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh train
exec python3 -m index_builder.cli demo "$@"
