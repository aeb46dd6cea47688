#!/usr/bin/env bash
# The main job on a fresh Debian machine: install cots (torch CPU wheel, no GPU needed) into a
# virtual environment, build the Open Clip Art gallery, train the default CPU recipe, evaluate,
# export the ONNX bundle, build the FAISS index and serve search on http://127.0.0.1:8000
# (Ctrl-C stops the server). Rerunning reuses the environment and every finished stage.
# Extra arguments go to `cots demo` (see --help).
# The environment is .venv in the repository (COTS_VENV=DIR puts it elsewhere); the python3 on
# PATH only creates it. Afterwards `source .venv/bin/activate` puts `cots` on a shell's PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export COTS_VENV="${COTS_VENV:-$PWD/.venv}"
bash deploy/install.sh train
echo "quickstart: cots is installed in $COTS_VENV; to use \`cots\` in a shell: source $COTS_VENV/bin/activate"
exec "$COTS_VENV/bin/python3" -m index_builder.cli demo "$@"
