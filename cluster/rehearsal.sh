#!/usr/bin/env bash
# A multi-node rehearsal of the KubeRay layout on one machine, without Kubernetes.
#
# Starts a Ray cluster on 127.0.0.1 shaped like cluster/base/rayjob-sdxl.yaml: a head that runs no
# work (--num-cpus 0) and three worker nodes, separate `ray start` processes, each advertising the
# custom resource of one role group (spo_sampler / spo_scorer / spo_trainer), with token auth on and
# the dashboard bound to 127.0.0.1. Then it `ray job submit`s the tiny SD1.5 job with the roles
# pinned the way the cluster configs pin them (ray.<role>.resources={spo_<role>: 1}), checks with
# the state API that every sampler, scorer and trainer worker ran on its own node, and stops the
# nodes it started (only those: never `ray stop`, which would stop every Ray cluster on the machine).
#
#   cluster/rehearsal.sh [dotted overrides for the job ...]
#
# Environment: SPO_REHEARSAL_GCS_PORT (6480), SPO_REHEARSAL_DASHBOARD_PORT (8280; the Ray client
# server uses +1, the nodes' dashboard agents +2..+5), SPO_REHEARSAL_DIR (a new /tmp/spo-rehearsal.*
# directory: Ray's temp dir, the token, outputs, placement.json), TORCH_EXTENSIONS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

GCS_PORT=${SPO_REHEARSAL_GCS_PORT:-6480}
DASHBOARD_PORT=${SPO_REHEARSAL_DASHBOARD_PORT:-8280}
CLIENT_PORT=$((DASHBOARD_PORT + 1))
AGENT_PORT=$((DASHBOARD_PORT + 2))
WORK=${SPO_REHEARSAL_DIR:-$(mktemp -d /tmp/spo-rehearsal.XXXXXX)}
RAY_TMP=$WORK/ray
OUT=$WORK/outputs
SUBMISSION_ID=spo-rehearsal-$(date +%s)-$$
mkdir -p "$RAY_TMP" "$OUT"

unset RAY_ADDRESS RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# The cluster's token lives in a file of its own, as it lives in a Secret on Kubernetes: every node
# and every client (ray job submit, the state API) reads it from RAY_AUTH_TOKEN_PATH. The default
# file, ~/.ray/auth_token (`ray get-auth-token --generate`), may belong to another local cluster.
export RAY_AUTH_TOKEN_PATH=$WORK/auth_token
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
OBJECT_STORE=$((256 * 1024 * 1024))

log() { echo "[rehearsal] $*"; }
start_failed() { # $1: log file of a `ray start` that just failed
  # On a loaded machine `ray start` gives up after 30 s waiting for its raylet to register, while
  # the raylet keeps starting: the node count below decides.
  if grep -q "timed out during startup" "$1"; then
    log "slow node start ($1), waiting for it to register"
    return 0
  fi
  echo "[rehearsal] ray start failed:" >&2
  tail -n 30 "$1" >&2
  exit 1
}

# Every process of this cluster: those whose command line names its temp dir (GCS, raylets,
# dashboard, monitors) or its Ray client server port, plus all their descendants (workers,
# agents, the job driver).
cluster_pids() {
  local p cmd roots=()
  for p in /proc/[0-9]*; do
    [[ ${p#/proc/} == "$$" ]] && continue
    cmd=$(tr '\0' ' ' 2>/dev/null < "$p/cmdline") || continue
    case $cmd in
      *"$RAY_TMP"* | *ray.util.client.server*"--port=$CLIENT_PORT "*) roots+=("${p#/proc/}") ;;
    esac
  done
  ((${#roots[@]})) || return 0
  ps -eo pid=,ppid= | awk -v roots="${roots[*]}" -v self="$$" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END {
      do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
      for (p in keep) if (p != self) print p
    }'
}

# shellcheck disable=SC2329  # called from stop_cluster, the EXIT trap
alive() { [[ -e /proc/$1 ]] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }

# shellcheck disable=SC2329  # the EXIT trap
stop_cluster() {
  local pids p left i
  pids=$(cluster_pids) || true
  [[ -z $pids ]] && return 0
  log "stopping the rehearsal cluster ($(wc -w <<< "$pids") processes)"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for i in {1..20}; do
    left=""
    for p in $pids; do if alive "$p"; then left+=" $p"; fi; done
    [[ -z $left ]] && return 0
    sleep 0.5
  done
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
  return 0
}
trap stop_cluster EXIT

if [[ -n $(cluster_pids) ]]; then
  echo "a Ray cluster already uses $RAY_TMP or port $CLIENT_PORT" >&2
  exit 1
fi

common=(--node-ip-address 127.0.0.1 --temp-dir "$RAY_TMP" --object-store-memory "$OBJECT_STORE"
        --num-gpus 0 --disable-usage-stats)
log "head: GCS 127.0.0.1:$GCS_PORT, dashboard and job API http://127.0.0.1:$DASHBOARD_PORT, no work (num-cpus 0)"
ray start --head "${common[@]}" --port "$GCS_PORT" --num-cpus 0 \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --dashboard-agent-listen-port "$AGENT_PORT" > "$WORK/head.log" 2>&1 || start_failed "$WORK/head.log"
i=1
for node in "sampler 3 4" "scorer 2 2" "trainer 2 2"; do
  read -r role cpus units <<< "$node"
  log "worker node $i: $role group, $cpus CPUs, {\"spo_$role\": $units}"
  ray start --address "127.0.0.1:$GCS_PORT" "${common[@]}" --num-cpus "$cpus" \
    --resources "{\"spo_$role\": $units}" --dashboard-agent-listen-port $((AGENT_PORT + i)) \
    > "$WORK/$role.log" 2>&1 || start_failed "$WORK/$role.log"
  i=$((i + 1))
done
python cluster/rehearsal_check.py wait --address "127.0.0.1:$GCS_PORT" --nodes 4 --timeout 180

RUNTIME_ENV=$(python -c 'import json, os; print(json.dumps({"env_vars": {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}}))')
log "submitting the tiny SD1.5 job ($SUBMISSION_ID): 2 samplers, 1 scorer, 1 trainer worker, roles pinned"
status=0
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . --submission-id "$SUBMISSION_ID" \
  --runtime-env-json "$RUNTIME_ENV" -- \
  python jobs/spo_sd15.py --preset tiny-sd15 "run.output_dir=$OUT" run.name=rehearsal run.max_rounds=2 \
  tracking.enabled=false ray.num_samplers=2 ray.num_scorers=1 ray.num_trainers=1 \
  "ray.sampler.resources={spo_sampler: 1}" "ray.scorer.resources={spo_scorer: 1}" \
  "ray.trainer.resources={spo_trainer: 1}" "$@" || status=$?

# Before the nodes stop: the state API still lists the job's finished actors and their nodes.
python cluster/rehearsal_check.py placement --address "127.0.0.1:$GCS_PORT" \
  --dashboard "http://127.0.0.1:$DASHBOARD_PORT" --submission-id "$SUBMISSION_ID" \
  --expect sampler=2 --expect scorer=1 --expect trainer=1 --out "$WORK/placement.json" || status=$?
log "run directory: $OUT/rehearsal, placement report: $WORK/placement.json"
exit "$status"
