"""SPO on Stable Diffusion v1.5, on the Ray cluster this job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/spo_sd15.py --preset tiny-sd15
    ray job submit ... -- python jobs/spo_sd15.py --config my.yaml train.learning_rate=1e-5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds spo_ray/

from spo_ray.entrypoints import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("spo", "sd15"))
