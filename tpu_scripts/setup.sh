#!/usr/bin/env bash
# Install jpeft (and JAX for TPUs) on every worker of a TPU VM or pod slice.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
USAGE="usage: setup.sh NAME --zone Z [--source DIR_OR_PIP_SPEC] [--project P] [--dry-run]

Copies a jpeft checkout to ~/jpeft on every worker and installs it with jax[tpu].
  --source   a local jpeft directory (default: this repository, $(dirname "$here")),
             or a pip requirement such as 'jpeft==0.1.0' or 'git+https://...' (then ~/jpeft
             is made empty: run.sh runs there, so copy your configs and data into it)
  --dry-run  print the gcloud commands, run nothing"
source "$here/common.sh"
parse_args "zone source project dry-run" "$@"
require zone
source_dir=${OPT_source:-$(dirname "$here")}
workers=(--zone "$OPT_zone" --worker=all)

if [[ -d $source_dir ]]; then
  gcloud_run compute tpus tpu-vm ssh "$NAME" "${workers[@]}" --command 'rm -rf ~/jpeft'
  gcloud_run compute tpus tpu-vm scp --recurse "$source_dir" "$NAME:~/jpeft" "${workers[@]}"
  package='-e ~/jpeft'
else
  gcloud_run compute tpus tpu-vm ssh "$NAME" "${workers[@]}" --command 'mkdir -p ~/jpeft'
  package=$(quote "$source_dir")
fi
gcloud_run compute tpus tpu-vm ssh "$NAME" "${workers[@]}" --command "pip install -U 'jax[tpu]' && pip install $package"
