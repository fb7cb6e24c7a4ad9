#!/usr/bin/env bash
# The demo: a local Ray cluster on 127.0.0.1, the tiny SD1.5 SPO job submitted with
# `ray job submit` (logs followed), then the cluster stopped. Outputs land in ./outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
trap 'scripts/local_cluster.sh stop' EXIT
scripts/local_cluster.sh start 8
ray job submit --address http://127.0.0.1:8265 --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S\": \"0.2\", \"TORCH_EXTENSIONS_DIR\": \"$TORCH_EXTENSIONS_DIR\"}}" \
  -- python jobs/spo_sd15.py --preset tiny-sd15 run.output_dir="$PWD/outputs" "$@"
echo "Run directory: $PWD/outputs/tiny-sd15 (metrics.jsonl, summary.json, final/pytorch_lora_weights.safetensors)"
