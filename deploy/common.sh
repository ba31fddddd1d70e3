# Shared by deploy/run-local.sh and deploy/run-hosts.sh (sourced, not run): their arguments, starting
# and stopping processes, waiting for the SuperLink, the flwr CLI's connection, node keys, the run's
# end state. The caller sets `script` (its name, for messages) before `parse_args "$@"`.

# parse_args "$@": sets tls auth nodes rounds out extra timeout and the faults link_down
# (NODE:ROUND), superlink_down (ROUND:SECONDS), restart_node (NODE:ROUND). Exit status 2 with the
# reason on any bad argument, before anything is made.
parse_args() {
  tls=0 auth=0 nodes="" rounds="" out="" extra="" timeout=1800 link_down="" superlink_down="" restart_node=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --tls) tls=1; shift ;;
      --auth) auth=1; shift ;;
      --supernodes) nodes="${2:-}"; shift 2 ;;
      --rounds) rounds="${2:-}"; shift 2 ;;
      --out) out="${2:-}"; shift 2 ;;
      --run-config) extra="${2:-}"; shift 2 ;;
      --timeout) timeout="${2:-}"; shift 2 ;;
      --link-down) link_down="${2:-}"; shift 2 ;;
      --superlink-down) superlink_down="${2:-}"; shift 2 ;;
      --restart-node) restart_node="${2:-}"; shift 2 ;;
      -h|--help) usage ;;
      *) echo "$script: unknown option $1" >&2; usage ;;
    esac
  done
  bad() { echo "$script: $*" >&2; exit 2; }
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || bad "--supernodes N (N >= 1) is required"
  [[ "$rounds" =~ ^[1-9][0-9]*$ ]] || bad "--rounds R (R >= 1) is required"
  [ -n "$out" ] || bad "--out DIR is required"
  [[ "$timeout" =~ ^[1-9][0-9]*$ ]] || bad "--timeout S must be a number of seconds >= 1"
  [ "$auth" = 0 ] || [ "$tls" = 1 ] || bad "--auth needs --tls (Flower authenticates SuperNodes over TLS only)"
  [[ ! " $extra" =~ [[:space:]](out|clients\.num|rounds)= ]] || bad "set out, clients.num and rounds with --out, --supernodes and --rounds"
  if [ -n "$link_down" ]; then
    [[ "$link_down" =~ ^([0-9]+):([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -lt "$nodes" ] \
      && [ "${BASH_REMATCH[2]}" -ge 1 ] && [ "${BASH_REMATCH[2]}" -lt "$rounds" ] \
      || bad "--link-down $link_down must be NODE:ROUND with NODE in 0..$((nodes - 1)) and ROUND in 1..$((rounds - 1)) (a later round sees it back)"
  fi
  if [ -n "$restart_node" ]; then
    [[ "$restart_node" =~ ^([0-9]+):([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -lt "$nodes" ] \
      && [ "${BASH_REMATCH[2]}" -ge 1 ] && [ "${BASH_REMATCH[2]}" -le "$rounds" ] \
      || bad "--restart-node $restart_node must be NODE:ROUND with NODE in 0..$((nodes - 1)) and ROUND in 1..$rounds"
  fi
  if [ -n "$superlink_down" ]; then
    [[ "$superlink_down" =~ ^([0-9]+):([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 1 ] \
      && [ "${BASH_REMATCH[1]}" -le "$rounds" ] && [ "${BASH_REMATCH[2]}" -ge 1 ] \
      || bad "--superlink-down $superlink_down must be ROUND:SECONDS with ROUND in 1..$rounds and SECONDS >= 1"
  fi
}
# make_out: the results folder, its deploy/ and logs/ folders, and FLWR_HOME inside it.
make_out() {
  out=$(python -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$out")
  work="$out/deploy"
  logs="$work/logs"
  mkdir -p "$logs" || exit 2
  export FLWR_HOME="$work/flwr_home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
  mkdir -p "$FLWR_HOME"
}
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

groups=()
stop_groups() {  # TERM every process group started here, KILL what is left after 10 s
  [ "${#groups[@]}" -gt 0 ] || return 0
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null; done
  for _ in $(seq 1 20); do
    alive=0; for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0; sleep 0.5
  done
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
}
start() {  # start a command in its own process group (so stop_groups stops its children too), log to $1
  local log="$1"; shift
  setsid "$@" > "$log" 2>&1 &
  groups+=($!)
}
fail() { echo "$script: $*" >&2; for f in "$logs"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done; exit 1; }

# wait_healthy URL CA [PREFIX...]: poll the SuperLink's /health (PREFIX: e.g. `ip netns exec NS`).
wait_healthy() {
  local url="$1" ca="$2"; shift 2
  "$@" python - "$url" "$ca" <<'PY'
import ssl, sys, time, urllib.request
url, ca = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca) if url.startswith("https") else None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
deadline = time.time() + 120
while time.time() < deadline:
    try:
        if opener.open(url, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(1)
PY
}

# write_connection NAME ADDRESS TLS: the flwr CLI's config.toml in $FLWR_HOME.
write_connection() {
  {
    echo "[superlink]"; echo "default = \"$1\""; echo; echo "[superlink.$1]"
    echo "address = \"$2\""
    if [ "$3" = 1 ]; then echo "root-certificates = \"$work/creds/ca.crt\""; else echo "insecure = true"; fi
  } > "$FLWR_HOME/config.toml"
}

# register_keys NAME N [PREFIX...]: register SuperNode keys 0..N-1 with the SuperLink.
register_keys() {
  local conn="$1" n="$2"; shift 2
  for i in $(seq 0 $((n - 1))); do
    # A key registered by an earlier run into the same --out (its database is kept) is fine.
    reply=$("$@" flwr supernode register "$work/creds/supernode-$i.pub" "$conn" 2>&1) \
      || grep -q "already in use" <<< "$reply" || { echo "$reply" >> "$logs/register.log"; fail "could not register SuperNode $i"; }
    echo "$reply" >> "$logs/register.log"
  done
}

# check_run NAME OUT [PREFIX...]: the run flwr-run.log started ended as finished:completed with a summary.
check_run() {
  local conn="$1" out="$2"; shift 2
  run_id=$(grep -o "Successfully started run [0-9]*" "$logs/flwr-run.log" | awk '{print $4}')
  [ -n "$run_id" ] || fail "flwr run started no run"
  status=$("$@" flwr ls "$conn" --run-id "$run_id" --format json 2>/dev/null \
    | python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])') || fail "cannot read the status of run $run_id"
  [ "$status" = "finished:completed" ] || fail "run $run_id ended as $status"
  [ -f "$out/summary.json" ] || fail "run $run_id completed but wrote no $out/summary.json"
}
