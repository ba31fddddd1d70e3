#!/usr/bin/env bash
# A real federation on this machine: a SuperLink and N SuperNodes on loopback, fedmm run through them
# with `flwr run`, the usual results folder written to DIR, every process started here stopped at the end.
#
#   deploy/run-local.sh [--tls] [--auth] --supernodes N --rounds R --out DIR [--run-config "key=value ..."]
#
# --tls        TLS with a fresh CA and SuperLink certificate (deploy/certs.py, kept in DIR/deploy/creds)
# --auth       SuperNode authentication: each SuperNode gets a key pair, registered with the SuperLink
#              before it starts (needs --tls)
# --run-config more fedmm config keys, e.g. "train.local_steps=5 data.examples_per_task=600"
# --timeout S  give up after S seconds (default 1800)
#
# Logs (SuperLink, each SuperNode, flwr run) go to DIR/deploy/logs. Exit status 0 only when the run
# finished as completed and DIR/summary.json exists.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tls=0 auth=0 nodes="" rounds="" out="" extra="" timeout=1800
usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) tls=1; shift ;;
    --auth) auth=1; shift ;;
    --supernodes) nodes="${2:-}"; shift 2 ;;
    --rounds) rounds="${2:-}"; shift 2 ;;
    --out) out="${2:-}"; shift 2 ;;
    --run-config) extra="${2:-}"; shift 2 ;;
    --timeout) timeout="${2:-}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "run-local.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "run-local.sh: --supernodes N (N >= 1) is required" >&2; exit 2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "run-local.sh: --rounds R (R >= 1) is required" >&2; exit 2; }
[ -n "$out" ] || { echo "run-local.sh: --out DIR is required" >&2; exit 2; }
[ "$auth" = 0 ] || [ "$tls" = 1 ] || { echo "run-local.sh: --auth needs --tls (Flower authenticates SuperNodes over TLS only)" >&2; exit 2; }
[[ ! " $extra" =~ [[:space:]](out|clients\.num|rounds)= ]] || {
  echo "run-local.sh: set out, clients.num and rounds with --out, --supernodes and --rounds" >&2; exit 2; }

out=$(python -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$out")
work="$out/deploy"
logs="$work/logs"
mkdir -p "$logs" || exit 2
export FLWR_HOME="$work/flwr_home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
  FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"
CONN=fedmm-local

groups=()
cleanup() {
  [ "${#groups[@]}" -gt 0 ] || return 0
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null; done
  for _ in $(seq 1 20); do
    alive=0; for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return; sleep 0.5
  done
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start() {  # start a command in its own process group (so cleanup stops its children too), log to $1
  local log="$1"; shift
  setsid "$@" > "$log" 2>&1 &
  groups+=($!)
}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
fail() { echo "run-local.sh: $*" >&2; for f in "$logs"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done; exit 1; }

creds_args=()
if [ "$tls" = 1 ]; then
  python "$ROOT/deploy/certs.py" --out "$work/creds" --supernodes "$([ "$auth" = 1 ] && echo "$nodes" || echo 0)" \
    > "$logs/certs.log" 2>&1 || fail "could not make credentials"
  creds_args=(--creds "$work/creds")
fi

port=$(free_port)
start "$logs/superlink.log" "$ROOT/deploy/superlink.sh" ${creds_args[@]+"${creds_args[@]}"} $([ "$auth" = 1 ] && echo --auth) \
  --port "$port" --database "$work/superlink.db"
python - "$port" "$tls" "$work/creds/ca.crt" <<'PY' || fail "the SuperLink did not start"
import ssl, sys, time, urllib.request
port, tls, ca = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
context = ssl.create_default_context(cafile=ca) if tls else None
deadline = time.time() + 120
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, context=context, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(1)
PY

{
  echo "[superlink]"; echo "default = \"$CONN\""; echo; echo "[superlink.$CONN]"
  echo "address = \"127.0.0.1:$port\""
  if [ "$tls" = 1 ]; then echo "root-certificates = \"$work/creds/ca.crt\""; else echo "insecure = true"; fi
} > "$FLWR_HOME/config.toml"

if [ "$auth" = 1 ]; then
  for i in $(seq 0 $((nodes - 1))); do
    # A key registered by an earlier run into the same --out (its database is kept) is fine.
    reply=$(flwr supernode register "$work/creds/supernode-$i.pub" "$CONN" 2>&1) \
      || grep -q "already in use" <<< "$reply" || { echo "$reply" >> "$logs/register.log"; fail "could not register SuperNode $i"; }
    echo "$reply" >> "$logs/register.log"
  done
fi

for i in $(seq 0 $((nodes - 1))); do
  key_args=()
  [ "$auth" = 1 ] && key_args=(--key "$work/creds/supernode-$i")
  start "$logs/supernode-$i.log" "$ROOT/deploy/supernode.sh" --superlink "127.0.0.1:$port" --partition-id "$i" \
    ${creds_args[@]+"${creds_args[@]}"} ${key_args[@]+"${key_args[@]}"} --port "$(free_port)"
done

config="out=\"$out\" rounds=$rounds clients.num=$nodes $extra"
# --stream: the ServerApp's log comes back into flwr-run.log, and flwr run returns when the run ends.
timeout "$timeout" flwr run "$ROOT" "$CONN" --stream --run-config "$config" \
  > "$logs/flwr-run.log" 2>&1 || fail "flwr run failed or timed out"
run_id=$(grep -o "Successfully started run [0-9]*" "$logs/flwr-run.log" | awk '{print $4}')
[ -n "$run_id" ] || fail "flwr run started no run"
status=$(flwr ls "$CONN" --run-id "$run_id" --format json 2>/dev/null \
  | python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])') || fail "cannot read the status of run $run_id"
[ "$status" = "finished:completed" ] || fail "run $run_id ended as $status"
[ -f "$out/summary.json" ] || fail "run $run_id completed but wrote no $out/summary.json"
echo "run-local.sh: run $run_id completed ($nodes SuperNodes, $rounds rounds$([ "$tls" = 1 ] && echo ", TLS")$([ "$auth" = 1 ] && echo ", SuperNode auth")); results in $out"
