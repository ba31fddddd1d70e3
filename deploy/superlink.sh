#!/usr/bin/env bash
# Start a Flower SuperLink for fedmm (foreground; put `&` after it or run it under a supervisor).
#
#   deploy/superlink.sh [--creds DIR] [--auth] [--host 0.0.0.0] [--port 9092] [--database FILE]
#
# --creds DIR  TLS with DIR/ca.crt, DIR/superlink.crt, DIR/superlink.key (from deploy/certs.py);
#              without it the SuperLink runs unencrypted (--insecure): a trusted network only.
# --auth       SuperNode authentication: only SuperNodes whose public key was registered
#              (`flwr supernode register KEY.pub CONNECTION`) may connect. Needs --creds.
# --host/--port where the one HTTPS port (Fleet, Control and Runtime APIs) listens; use 0.0.0.0 to
#              serve other machines. --database keeps registered nodes and runs across restarts.
set -euo pipefail
creds="" auth=0 host=127.0.0.1 port=9092 database=":flwr-in-memory:"
while [ $# -gt 0 ]; do
  case "$1" in
    --creds) creds="$2"; shift 2 ;;
    --auth) auth=1; shift ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    *) echo "superlink.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
args=(--host "$host" --port "$port" --database "$database" --isolation subprocess)
if [ -n "$creds" ]; then
  for f in ca.crt superlink.crt superlink.key; do
    [ -f "$creds/$f" ] || { echo "superlink.sh: $creds/$f is missing (make it with deploy/certs.py)" >&2; exit 2; }
  done
  args+=(--ssl-ca-certfile "$creds/ca.crt" --ssl-certfile "$creds/superlink.crt" --ssl-keyfile "$creds/superlink.key")
else
  [ "$auth" = 0 ] || { echo "superlink.sh: --auth needs TLS (--creds DIR)" >&2; exit 2; }
  args+=(--insecure)
fi
[ "$auth" = 0 ] || args+=(--enable-supernode-auth)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}
exec flower-superlink "${args[@]}"
