#!/usr/bin/env bash
# Start a Flower SuperNode that serves fedmm's ClientApp as one client of the federation (foreground).
#
#   deploy/supernode.sh --superlink HOST:PORT --partition-id I [--creds DIR] [--key FILE] [--port 9094]
#
# --partition-id  this node's client id, 0 .. clients.num-1. It decides the node's data partition
#                 and its modality-task profile (client i gets profile i mod #profiles, in the order
#                 the run config lists clients.profiles).
# --creds DIR     verify the SuperLink's certificate against DIR/ca.crt (TLS); without it --insecure.
# --key FILE      this node's private key (OpenSSH, from deploy/certs.py) when the SuperLink
#                 authenticates SuperNodes; its FILE.pub must be registered first.
# --port          this node's local Runtime API port: every SuperNode on one machine needs its own.
# --data-path DIR train on this machine's own data instead of a generated partition: DIR/<task> is a
#                 dataset saved with `datasets.Dataset.save_to_disk` (image and / or text columns as
#                 the task reads, integer label), one folder per task of the node's profile.
# --worker-socket PATH  where this node's model worker listens (default
#                 ${TMPDIR:-/tmp}/fedmm-worker-<uid>-<port>.sock). Flower starts a fresh ClientApp process
#                 per message; the worker (`fedmm worker`, started here, stopped with the SuperNode)
#                 keeps the model and the node's data loaded across messages, and the ClientApp
#                 process only forwards to it (node config model-worker=PATH).
# --no-model-worker     answer each message in Flower's per-message ClientApp process instead.
# --connect-timeout S   stop (exit status 1) when the SuperLink has not answered for S seconds, at the
#                 start or after losing it mid-run (default 300; 0 waits for ever).
set -euo pipefail
superlink="" partition="" creds="" key="" port=9094 host=127.0.0.1 data_path="" worker=1 socket="" connect_timeout=300
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --partition-id) partition="$2"; shift 2 ;;
    --creds) creds="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --data-path) data_path="$2"; shift 2 ;;
    --worker-socket) socket="$2"; shift 2 ;;
    --no-model-worker) worker=0; shift ;;
    --connect-timeout) connect_timeout="$2"; shift 2 ;;
    *) echo "supernode.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$superlink" ] || { echo "supernode.sh: --superlink HOST:PORT is required" >&2; exit 2; }
[[ "$partition" =~ ^[0-9]+$ ]] || { echo "supernode.sh: --partition-id must be a number >= 0" >&2; exit 2; }
[[ "$connect_timeout" =~ ^[0-9]+$ ]] || { echo "supernode.sh: --connect-timeout must be a number of seconds >= 0" >&2; exit 2; }
[[ "$superlink" =~ ^.+:[0-9]+$ ]] || { echo "supernode.sh: --superlink $superlink is not HOST:PORT" >&2; exit 2; }
# Flower's SuperNode retries an address that does not answer, or a failed TLS handshake, with only a
# warning per attempt: one probe says up front which address and how long, and stops on a wrong CA,
# so neither is a silent wait. It prints `unreachable`, `ca: <why>`, `tls: <why>` or nothing.
ca=""
if [ -n "$creds" ] && [ -f "$creds/ca.crt" ]; then ca="$creds/ca.crt"; fi
probe=$(python - "$superlink" "$ca" <<'PY'
import socket, ssl, sys
host, _, port = sys.argv[1].rpartition(":")
host = host.strip("[]")
try:
    context = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else None
except (OSError, ValueError) as err:  # a CA file that is no certificate: Flower would retry in silence
    sys.exit(print(f"ca: {err}"))
try:
    raw = socket.create_connection((host, int(port)), timeout=5)
except (OSError, ValueError):
    sys.exit(print("unreachable"))
with raw:
    try:
        if context is not None:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as err:
        print("tls:", err.verify_message or err.reason or err)
    except (OSError, ValueError):
        pass  # it answers; any other handshake trouble is Flower's to report
PY
)
if [ "$probe" = unreachable ]; then
  if [ "$connect_timeout" = 0 ]; then
    echo "supernode.sh: the SuperLink at $superlink does not answer yet; waiting for it (--connect-timeout 0)" >&2
  else
    echo "supernode.sh: the SuperLink at $superlink does not answer yet; this node waits up to ${connect_timeout} s" \
      "(--connect-timeout), then stops with exit status 1" >&2
  fi
elif [[ "$probe" == ca:* ]]; then
  echo "supernode.sh: $ca is not a CA certificate that TLS can load: ${probe#ca: }" >&2
  exit 2
elif [ -n "$probe" ]; then
  echo "supernode.sh: TLS verification of the SuperLink at $superlink failed against $ca: ${probe#tls: }" \
    "(is it the CA that signed the SuperLink's certificate, and does that certificate name this address?)" >&2
  exit 2
fi
node_config="partition-id=$partition"
if [ -n "$data_path" ]; then
  [ -d "$data_path" ] || { echo "supernode.sh: --data-path $data_path is not a folder" >&2; exit 2; }
  [[ "$data_path" != *'"'* ]] || { echo "supernode.sh: --data-path must not contain a double quote" >&2; exit 2; }
  node_config="$node_config data-path=\"$(cd "$data_path" && pwd)\""
fi
if [ "$worker" = 1 ]; then
  socket="${socket:-${TMPDIR:-/tmp}/fedmm-worker-$(id -u)-$port.sock}"
  [[ "$socket" != *'"'* ]] || { echo "supernode.sh: --worker-socket must not contain a double quote" >&2; exit 2; }
  # Started before the exec below, so the worker's parent is the SuperNode itself: it exits with it.
  python -m fedmm.cli worker --socket "$socket" --exit-with-parent &
  worker_pid=$!
  for _ in $(seq 1 600); do
    [ -S "$socket" ] && break
    kill -0 "$worker_pid" 2>/dev/null || { echo "supernode.sh: the model worker did not start" >&2; exit 1; }
    sleep 0.2
  done
  [ -S "$socket" ] || { echo "supernode.sh: the model worker did not listen on $socket within 120 s" >&2; exit 1; }
  node_config="$node_config model-worker=\"$socket\""
fi
args=(--superlink "$superlink" --host "$host" --port "$port" --node-config "$node_config")
[ "$connect_timeout" = 0 ] || args+=(--max-wait-time "$connect_timeout")
if [ -n "$creds" ]; then
  [ -f "$creds/ca.crt" ] || { echo "supernode.sh: $creds/ca.crt is missing" >&2; exit 2; }
  args+=(--root-certificates "$creds/ca.crt")
else
  args+=(--insecure)
fi
if [ -n "$key" ]; then
  [ -f "$key" ] || { echo "supernode.sh: key $key is missing" >&2; exit 2; }
  [ -n "$creds" ] || { echo "supernode.sh: --key needs TLS (--creds DIR)" >&2; exit 2; }
  args+=(--auth-supernode-private-key "$key")
fi
exec flower-supernode "${args[@]}"
