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
script=run-local.sh
source "$ROOT/deploy/common.sh"
parse_args "$@"
[ -z "$link_down$superlink_down$restart_node" ] || {
  echo "$script: network faults need separate hosts: use deploy/run-hosts.sh" >&2; exit 2; }
make_out
CONN=fedmm-local
trap stop_groups EXIT
trap 'exit 130' INT TERM
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

creds_args=()
if [ "$tls" = 1 ]; then
  python "$ROOT/deploy/certs.py" --out "$work/creds" --supernodes "$([ "$auth" = 1 ] && echo "$nodes" || echo 0)" \
    > "$logs/certs.log" 2>&1 || fail "could not make credentials"
  creds_args=(--creds "$work/creds")
fi

port=$(free_port)
start "$logs/superlink.log" "$ROOT/deploy/superlink.sh" ${creds_args[@]+"${creds_args[@]}"} $([ "$auth" = 1 ] && echo --auth) \
  --port "$port" --database "$work/superlink.db"
wait_healthy "$([ "$tls" = 1 ] && echo https || echo http)://127.0.0.1:$port/health" "$work/creds/ca.crt" \
  || fail "the SuperLink did not start"
write_connection "$CONN" "127.0.0.1:$port" "$tls"
[ "$auth" = 0 ] || register_keys "$CONN" "$nodes"

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
check_run "$CONN" "$out"
echo "run-local.sh: run $run_id completed ($nodes SuperNodes, $rounds rounds$([ "$tls" = 1 ] && echo ", TLS")$([ "$auth" = 1 ] && echo ", SuperNode auth")); results in $out"
