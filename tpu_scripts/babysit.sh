#!/usr/bin/env bash
# Keep a run going on spot / preemptible TPUs: whenever the TPU is gone or preempted, recreate
# it, set it up and run the same command again, which resumes from the latest checkpoint.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
USAGE="usage: babysit.sh NAME --zone Z --type ACCEL [--spot | --reserved] [--version RUNTIME] [--source S]
                  [--interval SECONDS] [--project P] [--dry-run] -- jpeft train CONFIG [key=value ...]

Loops until the command exits 0 on a TPU that is still READY: if NAME is missing, PREEMPTED or
TERMINATED it is deleted, created (create.sh), set up (setup.sh), and the command is run again
(run.sh). jpeft train resumes from the latest checkpoint in its out_dir, so out_dir must outlive
the TPU (a bucket mounted on every worker); a run that had finished returns at once. A command that
fails while its TPU stays READY (not ssh losing the host: exit 255) is an error of its own, and
babysit.sh stops with its exit status instead of retrying it.
  --interval  seconds between checks after the run stops (default 60)
  --dry-run   print the gcloud commands of one recovery round, run nothing"
source "$here/common.sh"
parse_args "zone type spot reserved version source interval project dry-run" "$@"
require zone type
((${#CMD[@]})) || usage_error "give the command to run after --, e.g. -- jpeft train CONFIG"
[[ -z ${OPT_spot:-} || -z ${OPT_reserved:-} ]] || usage_error "--spot and --reserved exclude each other"
mapfile -t common < <(passthrough zone project dry-run)
mapfile -t create < <(passthrough type spot reserved version)
mapfile -t setup < <(passthrough source)

recover() {
  "$here/delete.sh" "$NAME" "${common[@]}" || true  # there may be nothing to delete
  "$here/create.sh" "$NAME" "${common[@]}" "${create[@]}"
  "$here/setup.sh" "$NAME" "${common[@]}" "${setup[@]}"
}

if [[ -n ${OPT_dry_run:-} ]]; then
  recover
  exec "$here/run.sh" "$NAME" "${common[@]}" -- "${CMD[@]}"
fi
tpu_state() {
  gcloud compute tpus tpu-vm describe "$NAME" --zone "$OPT_zone" ${OPT_project:+--project "$OPT_project"} \
    --format='value(state)' 2>/dev/null || echo MISSING
}
while true; do
  state=$(tpu_state)
  if [[ $state != READY ]]; then
    echo "babysit.sh: $NAME is $state; recreating it" >&2
    recover
  fi
  status=0
  "$here/run.sh" "$NAME" "${common[@]}" -- "${CMD[@]}" || status=$?
  # A preempted jpeft train checkpoints and exits 0 too, and the TPU goes down seconds later: wait before
  # asking whether it is still READY (a finished run re-run returns at once, so a wrong guess costs little).
  sleep "${OPT_interval:-60}"
  state=$(tpu_state)
  if [[ $state == READY ]] && ((status == 0)); then
    echo "babysit.sh: the run finished" >&2
    exit 0
  fi
  if [[ $state == READY ]] && ((status != 255)); then
    echo "babysit.sh: the command failed (exit $status) on a TPU that is still READY; not retrying it" >&2
    exit "$status"
  fi
  echo "babysit.sh: the run stopped (exit $status, $NAME $state); going on" >&2
done
