"""Helpers of scripts/mlflow_ui_check.sh: look up the run, name its last images, judge the pages.

    python scripts/mlflow_ui_check.py ids DB_URI RUN_NAME        -> "<experiment id> <run id>"
    python scripts/mlflow_ui_check.py last-image DB_URI RUN_ID KEY -> the artifact path of KEY's last image
    python scripts/mlflow_ui_check.py check OUT                   -> exit 1 listing what is missing
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Chart titles the run's "Model metrics" tab must show: step and round metrics, and the two image panels.
CHARTS = ("loss", "grad_norm", "mean_score", "kept_fraction", "policy_lag", "pairs_per_s", "validation", "pairs")
MIN_SCREENSHOT_BYTES = 20_000  # a blank or error page compresses far below this


def ids(uri: str, run_name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("spo-ray")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return f"{experiment.experiment_id} {run.info.run_id}"


def last_image(uri: str, run_id: str, key: str) -> str:
    from mlflow.tracking import MlflowClient

    from spo_ray.tracking import logged_images

    return [path for k, _, path in logged_images(MlflowClient(tracking_uri=uri), run_id) if k == key][-1]


def problems(out: Path) -> list[str]:
    found = []
    metrics = (out / "metrics.html").read_text() if (out / "metrics.html").exists() else ""
    for name in CHARTS:
        if not re.search(rf">\s*{re.escape(name)}\s*<", metrics):
            found.append(f"metrics page: no chart titled {name}")
    if metrics.count("<canvas") + metrics.count("<svg") < 10:
        found.append("metrics page: the charts were not drawn")
    for key in ("validation", "pairs"):
        page = (out / f"{key}.html").read_text() if (out / f"{key}.html").exists() else ""
        path = (out / f"{key}.path").read_text().strip()
        if not re.search(rf'<img[^>]*alt="{re.escape(path)}"[^>]*src="blob:', page):
            found.append(f"the {key} image ({path}) did not load in the artifact preview")
    for shot in ("metrics", "validation", "pairs"):
        size = (out / f"{shot}.png").stat().st_size if (out / f"{shot}.png").exists() else 0
        if size < MIN_SCREENSHOT_BYTES:
            found.append(f"{shot}.png is missing or blank ({size} bytes)")
    return found


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "ids":
        print(ids(*args))
    elif command == "last-image":
        print(last_image(*args))
    elif command == "check":
        missing = problems(Path(args[0]))
        print("\n".join(missing) if missing else "charts and images present")
        return 1 if missing else 0
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
