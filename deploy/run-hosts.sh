#!/usr/bin/env bash
# A real federation over separate network hosts on this machine: one network namespace per host (a
# SuperLink host, N SuperNode hosts, a user host that runs the flwr CLI) with its own address on a
# private bridge (deploy/hosts.py), fedmm run with `flwr run`, the results folder written to DIR, and
# everything made here (namespaces, links, processes) removed on success, failure and Ctrl-C.
#
#   deploy/run-hosts.sh [--tls] [--auth] --supernodes N --rounds R --out DIR [--run-config "key=value ..."]
#                       [--link-down NODE:ROUND] [--superlink-down ROUND:SECONDS] [--restart-node NODE:ROUND]
#
# --tls, --auth, --run-config, --timeout S   as deploy/run-local.sh; the SuperLink's certificate names
#              its host address (and 127.0.0.1, where its own SuperExec reaches it), not localhost
# --link-down NODE:ROUND      unplug SuperNode NODE's cable once it has answered round ROUND-1's
#              evaluation, plug it back once round ROUND's training is decided without it: counted
#              missing after the reply timeout, or, where the SuperLink missed its heartbeats first
#              (about 40-60 s after the last), rejected as node-unavailable and left out of the next
#              round's sample while it reconnects
# --superlink-down ROUND:SECONDS  unplug the SuperLink host's cable for SECONDS once round ROUND-1 is
#              recorded (keep SECONDS under the one-minute heartbeat window and the run goes on)
# --restart-node NODE:ROUND   stop SuperNode NODE (SIGTERM) once round ROUND-1 is recorded and start
#              it again at once, with the same key and partition (it takes its partition back)
# Without strategy.reply_timeout in --run-config, a run with a fault waits 45 s for missing replies:
# a SuperNode plugged back in retries with Flower's backoff, up to 20 s between tries, and must still
# train the next round in time (20 s lost that round under CPU contention).
#
# Needs root (network namespaces); refuses with exit status 3 otherwise. Logs go to DIR/deploy/logs,
# fault events (JSON lines) to DIR/deploy/faults.jsonl. Exit status 0 only when the run finished as
# completed and DIR/summary.json exists.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script=run-hosts.sh
source "$ROOT/deploy/common.sh"
parse_args "$@"
why=$(python "$ROOT/deploy/hosts.py" check 2>&1) || { echo "$script: ${why#hosts.py: }" >&2; exit 3; }
make_out

tag=$(python -c 'import secrets; print(secrets.token_hex(3))')
CONN=fedmm-hosts PORT=9092
ns() { echo "fedmm-$tag-$1"; }
in_host() { local host="$1"; shift; ip netns exec "$(ns "$host")" "$@"; }
sockets=()
injector=""
teardown() {
  [ -z "$injector" ] || kill "$injector" 2>/dev/null
  stop_groups
  python "$ROOT/deploy/hosts.py" down --tag "$tag" >> "$logs/hosts.log" 2>&1 \
    || echo "$script: could not remove every namespace of network $tag: see $logs/hosts.log" >&2
  [ "${#sockets[@]}" = 0 ] || rm -f "${sockets[@]}"
}
trap teardown EXIT
trap 'exit 130' INT TERM
# Processes in the hosts reach each other directly: a proxy of this machine is not on their network.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY grpc_proxy

hosts=(link user)
for i in $(seq 0 $((nodes - 1))); do hosts+=("node$i"); done
python "$ROOT/deploy/hosts.py" up --tag "$tag" "${hosts[@]}" > "$work/hosts.txt" 2> "$logs/hosts.log" \
  || fail "could not make the hosts (network $tag)"
address() { awk -v h="$1" '$1 == h {print $2}' "$work/hosts.txt"; }
link_address=$(address link)
echo "$script: network $tag: SuperLink host $link_address, user host $(address user), SuperNode hosts" \
  "$(for i in $(seq 0 $((nodes - 1))); do printf '%s ' "$(address "node$i")"; done)"

creds_args=()
if [ "$tls" = 1 ]; then
  python "$ROOT/deploy/certs.py" --out "$work/creds" --hosts "$link_address" \
    --supernodes "$([ "$auth" = 1 ] && echo "$nodes" || echo 0)" > "$logs/certs.log" 2>&1 || fail "could not make credentials"
  creds_args=(--creds "$work/creds")
fi
start "$logs/superlink.log" ip netns exec "$(ns link)" "$ROOT/deploy/superlink.sh" ${creds_args[@]+"${creds_args[@]}"} \
  $([ "$auth" = 1 ] && echo --auth) --host 0.0.0.0 --port "$PORT" --database "$work/superlink.db"
wait_healthy "$([ "$tls" = 1 ] && echo https || echo http)://$link_address:$PORT/health" "$work/creds/ca.crt" \
  in_host user || fail "the SuperLink did not answer from the user host"
write_connection "$CONN" "$link_address:$PORT" "$tls"
[ "$auth" = 0 ] || register_keys "$CONN" "$nodes" in_host user

start_node() {
  local i="$1" key_args=()
  [ "$auth" = 1 ] && key_args=(--key "$work/creds/supernode-$i")
  start "$logs/supernode-$i.log" ip netns exec "$(ns "node$i")" "$ROOT/deploy/supernode.sh" --superlink "$link_address:$PORT" \
    --partition-id "$i" ${creds_args[@]+"${creds_args[@]}"} ${key_args[@]+"${key_args[@]}"} \
    --worker-socket "${sockets[$i]}" --port 9094
}
for i in $(seq 0 $((nodes - 1))); do
  sockets+=("${TMPDIR:-/tmp}/fedmm-$tag-node$i.sock")  # one file system for all hosts: one socket each
  start_node "$i"
done

# --- faults: each fires once the round before it is recorded in metrics.jsonl -----------------------
event() { printf '{"time": %s, "event": "%s", "host": "%s", "round": %s}\n' "$(date +%s.%N)" "$1" "$2" "$3" >> "$work/faults.jsonl"; }
recorded() {  # the last complete round in metrics.jsonl (-1 before the first record)
  python -c 'import json,sys
rounds = [json.loads(l).get("round", -1) for l in open(sys.argv[1]) if l.strip()] if __import__("os").path.exists(sys.argv[1]) else []
print(max(rounds, default=-1))' "$out/metrics.jsonl" 2>/dev/null || echo -1
}
cable() { python "$ROOT/deploy/hosts.py" cable --tag "$tag" "$1" "$2" >> "$logs/hosts.log" 2>&1 && event "cable-$2" "$1" "$3"; }
evaluations_sent() {  # evaluation replies a SuperNode has pushed, read from its log
  awk '/Sending: evaluate message/ { pending = 1 } /Sending: (train|query) message/ { pending = 0 }
       /Sent successfully/ && pending { sent++; pending = 0 } END { print sent + 0 }' "$logs/supernode-$1.log"
}
wait_round() { while [ "$(recorded)" -lt "$1" ]; do sleep 0.2; done; }
inject() {
  if [ -n "$link_down" ]; then
    local node=${link_down%%:*} round=${link_down##*:}
    # Unplug the node as soon as it has sent its reply to round ROUND-1's evaluation (round 0 is the
    # initial one): it then has nothing owed for that round and waits 3 s before asking for more, so
    # round ROUND's training cannot slip out first, as it could while we waited for the round's record.
    # A node left out of some evaluation never reaches the count: then the record decides.
    until [ "$(evaluations_sent "$node")" -ge "$round" ] || [ "$(recorded)" -ge $((round - 1)) ]; do sleep 0.2; done
    cable "node$node" down "$round"
    # Back in once the round's training is decided without it: its reply timed out, or the SuperLink
    # answered for it (unplugged past its heartbeat window, about 40-60 s, it is taken for offline).
    until grep -qE "round $round: ([0-9]+ of [0-9]+ training replies arrived|dropped reply of node)" "$logs/flwr-run.log" \
      || [ "$(recorded)" -ge "$round" ]; do sleep 0.2; done
    cable "node$node" up "$round"
  fi
  if [ -n "$superlink_down" ]; then
    local round=${superlink_down%%:*} seconds=${superlink_down##*:}
    wait_round $((round - 1)); cable link down "$round"; sleep "$seconds"; cable link up "$round"
  fi
  if [ -n "$restart_node" ]; then
    local node=${restart_node%%:*} round=${restart_node##*:}
    wait_round $((round - 1))
    # TERM: the SuperNode says goodbye (deactivates), so its key may connect again at once; a node
    # killed outright is refused (code 2004) until its heartbeats lapse, about a minute.
    python "$ROOT/deploy/hosts.py" stop --tag "$tag" "node$node" >> "$logs/hosts.log" 2>&1 \
      && event stopped "node$node" "$round"
    rm -f "${sockets[$node]}"
    mv "$logs/supernode-$node.log" "$logs/supernode-$node.before-restart.log"
    start_node "$node"; event started "node$node" "$round"
  fi
}

config="out=\"$out\" rounds=$rounds clients.num=$nodes $extra"
if [ -n "$link_down$superlink_down$restart_node" ] && [[ ! " $extra" =~ [[:space:]]strategy\.reply_timeout= ]]; then
  config="$config strategy.reply_timeout=45"
fi
: > "$work/faults.jsonl"
: > "$logs/flwr-run.log"
if [ -n "$link_down$superlink_down$restart_node" ]; then inject & injector=$!; fi
# --stream: the ServerApp's log comes back into flwr-run.log, and flwr run returns when the run ends.
in_host user timeout "$timeout" flwr run "$ROOT" "$CONN" --stream --run-config "$config" \
  >> "$logs/flwr-run.log" 2>&1 || fail "flwr run failed or timed out"
check_run "$CONN" "$out" in_host user
echo "$script: run $run_id completed over $((nodes + 2)) hosts ($nodes SuperNodes, $rounds rounds$([ "$tls" = 1 ] \
  && echo ", TLS for $link_address")$([ "$auth" = 1 ] && echo ", SuperNode auth")); results in $out"
