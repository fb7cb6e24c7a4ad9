#!/usr/bin/env bash
# The MLflow UI over a tiny run, as a person sees it: trains 3 rounds in process (a validation
# grid and a win/lose strip every round), serves the store with `mlflow ui` on 127.0.0.1, renders
# the run's metric charts and its last images with headless Chromium (Debian package `chromium`),
# saves screenshots, and fails when the rendered pages lack the charts or the images.
# Everything stays under OUT (default /tmp/spo-mlflow-ui-check), never in the repository.
#
#   scripts/mlflow_ui_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/spo-mlflow-ui-check}"
PORT="${MLFLOW_UI_CHECK_PORT:-5071}"
CHROMIUM="$(command -v chromium || command -v chromium-browser || true)"
[[ -n "$CHROMIUM" ]] || { echo "mlflow_ui_check: chromium not found (apt-get install chromium)" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== a tiny run (3 rounds)"
env -u MLFLOW_TRACKING_URI python -m spo_ray train --preset tiny-sd15 "run.output_dir=$OUT/runs" run.name=ui-check \
    run.max_rounds=3 run.progress=false data.max_prompts=12 tracking.log_pair_images_every=1 \
    tracking.system_metrics=false > "$OUT/train.log" 2>&1
DB="sqlite:///$OUT/runs/mlflow.db"

echo "== mlflow ui on 127.0.0.1:$PORT"
env -u MLFLOW_TRACKING_URI mlflow ui --backend-store-uri "$DB" --host 127.0.0.1 --port "$PORT" > "$OUT/ui.log" 2>&1 &
UI_PID=$!
trap 'kill $UI_PID 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "mlflow ui did not start (see $OUT/ui.log)" >&2; exit 1; }
read -r EXPERIMENT RUN < <(python scripts/mlflow_ui_check.py ids "$DB" ui-check)
BASE="http://127.0.0.1:$PORT/#/experiments/$EXPERIMENT/runs/$RUN"

render() {  # render URL NAME HEIGHT: a screenshot, and the DOM after the page's scripts ran
    local flags=(--headless=new --no-sandbox --disable-gpu --hide-scrollbars "--window-size=1600,$3"
                 --virtual-time-budget=25000 --run-all-compositor-stages-before-draw)
    timeout 180 "$CHROMIUM" "${flags[@]}" --screenshot="$OUT/$2.png" "$1" > /dev/null 2>&1 || true
    timeout 180 "$CHROMIUM" "${flags[@]}" --dump-dom "$1" > "$OUT/$2.html" 2> /dev/null || true
}

echo "== rendering"
render "$BASE/model-metrics" metrics 9000  # charts draw only in view: tall enough for all of them
for key in validation pairs; do  # the last grid and strip in the artifact browser's preview
    python scripts/mlflow_ui_check.py last-image "$DB" "$RUN" "$key" > "$OUT/$key.path"
    render "$BASE/artifacts/$(cat "$OUT/$key.path")" "$key" 1200
done

echo "== checks"
python scripts/mlflow_ui_check.py check "$OUT"
echo "screenshots: $OUT/metrics.png $OUT/validation.png $OUT/pairs.png"
