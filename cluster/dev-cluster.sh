#!/usr/bin/env bash
# A local development cluster: a Ray head on 127.0.0.1 with token auth, and SeaweedFS as S3.
#   cluster/dev-cluster.sh up [--dir runs/devcluster] [--cpus N]   # foreground; Ctrl+C stops both
#   source runs/devcluster/env.sh                                  # in another shell
#   cluster/dev-cluster.sh down [--dir runs/devcluster]            # from any shell
# It prints the exports a client needs; the token and the S3 secret key stay in 0600 files of the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m ops.devcluster "$@"
