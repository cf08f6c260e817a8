#!/usr/bin/env bash
# Run one command on every worker at once (JAX multi-host programs start on all hosts), each
# host logging to its own file.
set -euo pipefail
USAGE="usage: run.sh NAME --zone Z [--log-dir D] [--project P] [--dry-run] -- jpeft train CONFIG [key=value ...]

Runs the command after -- in ~/jpeft on all workers, its output in D/\$(hostname).log on each
(default D: ~/jpeft-logs) and on this terminal. A preempted jpeft train checkpoints and exits 0;
run the same command again (or use babysit.sh) to resume."
source "$(dirname "$0")/common.sh"
parse_args "zone log-dir project dry-run" "$@"
require zone
((${#CMD[@]})) || usage_error "give the command to run after --, e.g. -- jpeft train CONFIG"
log_dir='~/jpeft-logs'
[[ -z ${OPT_log_dir:-} ]] || log_dir=$OPT_log_dir
# a leading ~/ stays unquoted, so the worker expands it; a relative D is under the worker's home
[[ $log_dir == "~/"* ]] && log_dir="~/$(quote "${log_dir#\~/}")" || log_dir=$(quote "$log_dir")
remote="set -o pipefail; mkdir -p $log_dir && logs=\$(cd $log_dir && pwd) && cd ~/jpeft && $(quote "${CMD[@]}") 2>&1 \
| tee \"\$logs/\$(hostname).log\""
gcloud_run compute tpus tpu-vm ssh "$NAME" --zone "$OPT_zone" --worker=all --command "$remote"
