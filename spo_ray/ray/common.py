"""Ray scaffolding every app shares (SPO training, SPM training, evaluation): the trainer's
resources and process group, the dataset split, worker set-up and the one float all-reduce.

Process group: ``cpu:gloo,cuda:nccl`` on GPU workers (NCCL serves CUDA tensors only; control
values stay on the worker's device anyway), ``gloo`` on CPU workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from spo_ray.config import RoleResources, role_threads

log = logging.getLogger(__name__)


def worker_setup(ray_config: Any, role: str) -> None:
    """First lines of every role actor and trainer worker: INFO logging (so ``ray job logs``
    shows the workers' progress lines) and the role's torch threads."""
    from spo_ray.run_log import configure_logging

    configure_logging(in_ray_worker=True)
    threads = role_threads(ray_config, role)
    if threads:
        torch.set_num_threads(threads)


def trainer_device(resources: RoleResources) -> torch.device:
    """This Ray Train worker's device: its GPU when the trainer role asks for GPUs, else the CPU."""
    if resources.num_gpus:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum over the trainer workers (the values themselves on one worker). The
    tensor lives on the worker's device: NCCL refuses CPU tensors."""
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def make_split(equal: Callable[[str], bool] = lambda name: False, in_order: Callable[[str], bool] = lambda name: False):
    """A Ray Train DataConfig that ``streaming_split``s each dataset with ``equal`` (balance the
    ranks, dropping a tail) and ``in_order`` (preserve the dataset's order) chosen by name."""
    import ray.train

    class StreamSplit(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.preserve_order |= in_order(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=equal(name))):
                    output[i][name] = split
            return output

    return StreamSplit()


def torch_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    resources: RoleResources,
    num_workers: int,
    run_name: str,
    run_dir: Path,
    datasets: dict[str, Any],
    dataset_config: Any,
    max_failures: int = 0,
):
    """A TorchTrainer with the role's resources per worker and the process group above."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = bool(resources.num_gpus)
    per_worker = {"CPU": resources.num_cpus, **resources.resources}
    if use_gpu:
        per_worker["GPU"] = resources.num_gpus
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name, storage_path=str(run_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures)),
        datasets=datasets,
        dataset_config=dataset_config,
    )
