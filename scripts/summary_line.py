"""One line of a run's summary.json: accounting, lag, weight sync, time (for scripts/gpu_check.sh)."""

import json
import sys

summary = json.load(open(sys.argv[1]))
a = summary["accounting"]
sampler = summary["telemetry"]["roles"].get("sampler", {}).get("totals", {})
fetches = max(sampler.get("policy_fetches", 0), 1)
if summary["accounting_problems"]:
    sys.exit(f"accounting problems: {summary['accounting_problems']}")
print(f"kept {a['kept']} trained {a['trained']} steps {a['optimizer_steps']} lag {summary['max_policy_lag_seen']} "
      f"policy fetches {sampler.get('policy_fetches', 0):.0f}, publish-to-usable "
      f"{sampler.get('publish_to_usable_s', 0) / fetches:.3f} s; {summary['seconds']:.0f} s")
