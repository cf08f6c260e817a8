#!/usr/bin/env bash
# Copy results (an adapter, metrics, plots) from a TPU worker back here.
set -euo pipefail
USAGE="usage: copy.sh NAME --zone Z --from REMOTE_PATH --to LOCAL_DIR [--worker N] [--project P] [--dry-run]

Copies REMOTE_PATH from worker N (default 0: jpeft's process 0 writes metrics and adapters)."
source "$(dirname "$0")/common.sh"
parse_args "zone from to worker project dry-run" "$@"
require zone from to
gcloud_run compute tpus tpu-vm scp --recurse "$NAME:$OPT_from" "$OPT_to" --zone "$OPT_zone" --worker="${OPT_worker:-0}"
