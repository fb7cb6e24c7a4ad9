"""Train a step-aware preference model (SPM) on the Ray cluster this job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_spm.py --preset spm-sd15
    ray job submit ... -- python jobs/train_spm.py --preset spm-tiny data.train=/data/train.parquet data.eval=/data/eval.parquet
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds spo_ray/

from spo_ray.entrypoints import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("spm", "spm-sd15"))
