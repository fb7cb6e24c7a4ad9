#!/usr/bin/env bash
# The checks a machine with a GPU runs in under 10 minutes, one line per check (PASS/FAIL and its
# figures); full logs and JSON go to ${OUT:-gpu-check}. Needs the CUDA build of torch:
#   make install TORCH="torch==2.13.0"   (the CUDA wheel on a GPU machine), then scripts/gpu_check.sh
#
#   1. SD1.5 role throughput in bf16: the published UNet/VAE/PickScore shapes with random weights,
#      per-role FLOP/s and MFU against the measured bf16 matmul rate, time per kept pair vs the bound
#   2. a tiny Ray job with every role on the one GPU by fractions (2 samplers, 1 scorer, 1 trainer)
#   3. the same job with torch.compile of the samplers' UNet and LoRA weight sync through the store
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
status=0

check() {  # name, seconds allowed, command...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - started)) s) $(tail -n 1 "$OUT/$name.log")"
  else
    echo "FAIL $name ($((SECONDS - started)) s): see $OUT/$name.log"
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /'
    status=1
  fi
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))" \
  || { echo "FAIL: no GPU visible to torch (install the CUDA build)"; exit 1; }

check sd15-roles 240 python - "$OUT" <<'EOF'
import json, sys, torch
from spo_ray.bench.flops import flops_report
from spo_ray.bench.roles import role_throughput
flops = flops_report("sd15", num_steps=20, divert_start_step=4, pool_size=4, num_inner_steps=0, kept_fraction=0.8)
roles = role_throughput("sd15", torch.device("cuda"), torch.bfloat16, flops=flops)
json.dump({"flops": flops, "roles": roles}, open(f"{sys.argv[1]}/sd15-roles.json", "w"), indent=2, default=str)
print(json.dumps({k: v for k, v in roles.items() if not isinstance(v, dict)}, default=str))
EOF

job() {  # name, overrides...: the tiny SD1.5 job with every role on GPU 0 by fractions, then its figures
  local name=$1
  shift
  python -m spo_ray train --engine ray --preset tiny-sd15 run.output_dir="$PWD/$OUT/runs" run.name="$name" \
    run.device=cuda run.max_rounds=4 run.progress=false ray.num_samplers=2 ray.num_scorers=1 ray.num_trainers=1 \
    ray.sampler.num_gpus=0.2 ray.scorer.num_gpus=0.2 ray.trainer.num_gpus=0.2 ray.renderer.num_gpus=0.1 "$@" \
    && python scripts/summary_line.py "$OUT/runs/$name/summary.json"
}
check ray-job-one-gpu 240 job fractions
check ray-job-compiled-sampler 240 job compiled model.compile_unet=true

exit $status
