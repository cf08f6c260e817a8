# Sourced by every tpu_scripts/*.sh: option parsing, and gcloud calls that --dry-run prints instead of running.
# A script sets USAGE, then calls `parse_args "OPTIONS IT TAKES" "$@"`; options land in OPT_<name>
# (dashes as underscores), the TPU name in NAME, anything after `--` in CMD.

usage_error() {
  echo "$(basename "$0"): $*" >&2
  echo "run $(basename "$0") --help for usage" >&2
  exit 2
}

parse_args() {
  local allowed=" $1 " opt
  shift
  NAME="" CMD=()
  while (($#)); do
    case $1 in
      -h | --help) echo "$USAGE"; exit 0 ;;
      --) shift; CMD=("$@"); break ;;
      --*)
        opt=${1#--}
        [[ $allowed == *" $opt "* ]] || usage_error "unknown option $1"
        case $opt in
          dry-run | spot | reserved) printf -v "OPT_${opt//-/_}" 1; shift ;;
          *) (($# >= 2)) && [[ $2 != --* ]] || usage_error "$1 needs a value"; printf -v "OPT_${opt//-/_}" %s "$2"; shift 2 ;;
        esac ;;
      *) [[ -z $NAME ]] || usage_error "unexpected argument $1"; NAME=$1; shift ;;
    esac
  done
  [[ -n $NAME ]] || usage_error "missing the TPU name (the first argument)"
}

require() {  # require zone type ...: each named option must have been given
  local opt var
  for opt; do
    var="OPT_${opt//-/_}"
    [[ -n ${!var:-} ]] || usage_error "--$opt is required"
  done
}

quote() {  # ARGS... as one shell line, each word quoted only where it needs it
  local word words=()
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

gcloud_run() {  # gcloud ARGS...: printed on stdout under --dry-run, else echoed to stderr and run
  local args=("$@")
  [[ -z ${OPT_project:-} ]] || args+=(--project "$OPT_project")
  if [[ -n ${OPT_dry_run:-} ]]; then
    quote gcloud "${args[@]}"
  else
    echo "+ $(quote gcloud "${args[@]}")" >&2
    gcloud "${args[@]}"
  fi
}

passthrough() {  # the options this script shares with the scripts it calls (babysit.sh)
  local opt var out=()
  for opt; do
    var="OPT_${opt//-/_}"
    case $opt in
      dry-run | spot | reserved) [[ -z ${!var:-} ]] || out+=("--$opt") ;;
      *) [[ -z ${!var:-} ]] || out+=("--$opt" "${!var}") ;;
    esac
  done
  ((${#out[@]} == 0)) || printf '%s\n' "${out[@]}"
}
