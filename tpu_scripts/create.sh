#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource (how spot and reserved capacity is
# granted), then wait until it is ready.
set -euo pipefail
USAGE="usage: create.sh NAME --zone Z --type ACCEL [--spot | --reserved] [--version RUNTIME] [--project P] [--dry-run]

Creates the queued resource NAME-qr holding the TPU node NAME, e.g. --type v5litepod-16
(16 v5e chips on 4 hosts) or v5p-16, and waits until it is ACTIVE.
  --spot        preemptible capacity (cheaper; see babysit.sh)
  --reserved    capacity from your reservation
  --version     TPU runtime (default: chosen by --type: v5litepod-* v2-alpha-tpuv5-lite,
                v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e, others tpu-ubuntu2204-base)
  --project     Google Cloud project (default: gcloud's configured one)
  --dry-run     print the gcloud commands, run nothing"
source "$(dirname "$0")/common.sh"
parse_args "zone type spot reserved version project dry-run" "$@"
require zone type
[[ -z ${OPT_spot:-} || -z ${OPT_reserved:-} ]] || usage_error "--spot and --reserved exclude each other"

case $OPT_type in
  v5litepod-*) version=v2-alpha-tpuv5-lite ;;
  v5p-*) version=v2-alpha-tpuv5 ;;
  v6e-*) version=v2-alpha-tpuv6e ;;
  *) version=tpu-ubuntu2204-base ;;
esac
tier=()
[[ -z ${OPT_spot:-} ]] || tier=(--spot)
[[ -z ${OPT_reserved:-} ]] || tier=(--reserved)

gcloud_run compute tpus queued-resources create "$NAME-qr" --node-id "$NAME" --zone "$OPT_zone" \
  --accelerator-type "$OPT_type" --runtime-version "${OPT_version:-$version}" "${tier[@]}"
[[ -z ${OPT_dry_run:-} ]] || exit 0
while true; do
  state=$(gcloud compute tpus queued-resources describe "$NAME-qr" --zone "$OPT_zone" \
    ${OPT_project:+--project "$OPT_project"} --format='value(state.state)')
  case $state in
    ACTIVE) echo "create.sh: $NAME is ready" >&2; exit 0 ;;
    FAILED | SUSPENDED) echo "create.sh: queued resource $NAME-qr is $state" >&2; exit 1 ;;
    *) echo "create.sh: $NAME-qr is $state; waiting" >&2; sleep 30 ;;
  esac
done
