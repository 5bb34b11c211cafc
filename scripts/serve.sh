#!/usr/bin/env bash
# Set up and run Steer on the embedded default: `bash scripts/serve.sh [--host H] [--port P]`.
# One process, SQLite + local blobs under STEER_DATA_DIR (default ~/.steer), the bundled SmolLM2,
# in-process training and inference. Prints the admin key on first start and where it listens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/venv.sh
ensure_venv ""
exec steer serve "$@"
