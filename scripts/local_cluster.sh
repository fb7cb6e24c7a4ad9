#!/usr/bin/env bash
# A local Ray cluster on 127.0.0.1 with token authentication on (explicitly, so a clean machine
# behaves like one that already has a token file).
#   scripts/local_cluster.sh start [num_cpus]   |   scripts/local_cluster.sh stop
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
case "${1:-start}" in
  start)
    ray get-auth-token --generate >/dev/null
    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" \
      --port "${RAY_GCS_PORT:-6379}" --num-cpus "${2:-8}" --disable-usage-stats >/dev/null
    echo "Ray cluster up: dashboard and job API at http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265} (token auth on)"
    ;;
  stop)
    ray stop --force >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 start [num_cpus] | stop" >&2; exit 2 ;;
esac
