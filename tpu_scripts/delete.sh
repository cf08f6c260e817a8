#!/usr/bin/env bash
# Delete a TPU made by create.sh: its queued resource and the node in it.
set -euo pipefail
USAGE="usage: delete.sh NAME --zone Z [--project P] [--dry-run]"
source "$(dirname "$0")/common.sh"
parse_args "zone project dry-run" "$@"
require zone
gcloud_run compute tpus queued-resources delete "$NAME-qr" --zone "$OPT_zone" --force --quiet
