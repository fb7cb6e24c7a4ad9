"""Weight sync, measured: one policy version from trainer rank 0 to N samplers, three ways.

- object store (what the engine does, spo_ray/ray/trainer.py ``Publisher``): rank 0 packs the
  weights (records.pack_tensors), ``ray.put``s them once and hands out the reference; each sampler
  ``ray.get``s it (on one node: a read of shared memory; across nodes: one transfer per node) and
  copies the views into its parameters (records.unpack_tensors, workers.fetch_policy);
- a torch.distributed broadcast from rank 0 to the samplers over their own gloo group, tensor by
  tensor, as OpenRLHF and veRL sync vLLM weights (with NCCL, on GPUs); each sampler receives into
  a buffer and copies it into its parameters;
- Ray Direct Transport (RDT, alpha in Ray 2.60) over a gloo collective group: rank 0's actor
  method returns the tensors with ``tensor_transport="gloo"`` and each sampler task that takes the
  reference receives them from rank 0's process (one send per sampler); then the same copy.

Printed per payload and sampler count: seconds from the publish call until every sampler holds
the version (the median of ``--repeats``, after a warm-up). Payloads: 3.2 MB (SD1.5 LoRA r4,
fp32) and 372 MB (SDXL LoRA r64, fp32); ``--mib`` for others. On one machine, actors as processes:

    PYTHONPATH=$PWD python scripts/bench_weight_sync.py --mib 3.2 372 --samplers 1 2 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import ray
import torch

from spo_ray import records

log = logging.getLogger("bench_weight_sync")
TENSORS = 64  # a LoRA has hundreds of small tensors, a UNet ~700 (fewer here: the bytes dominate)


def make_weights(mib: float) -> dict[str, torch.Tensor]:
    n = max(int(mib * 2**20 / 4 / TENSORS), 1)
    return {f"w{i}": torch.full((n,), float(i)) for i in range(TENSORS)}


def join_group(address: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=rank, world_size=world)


@ray.remote(num_cpus=0)
class Trainer:
    def __init__(self, mib: float):
        torch.set_num_threads(1)
        self.weights = make_weights(mib)

    def join(self, address: str, world: int) -> None:
        join_group(address, 0, world)

    def put(self) -> list[ray.ObjectRef]:  # a list: the reference is handed out, not resolved
        return [ray.put(records.pack_tensors(self.weights))]

    def broadcast(self) -> None:
        import torch.distributed as dist

        for tensor in self.weights.values():
            dist.broadcast(tensor, src=0)

    @ray.method(tensor_transport="gloo")
    def tensors(self) -> dict[str, torch.Tensor]:  # Ray Direct Transport: sent to each receiver by gloo
        return self.weights


@ray.remote(num_cpus=0)
class Sampler:
    def __init__(self, mib: float):
        torch.set_num_threads(1)
        self.weights = {k: torch.zeros_like(v) for k, v in make_weights(mib).items()}

    def join(self, address: str, rank: int, world: int) -> None:
        join_group(address, rank, world)

    def load_ref(self, refs: list[ray.ObjectRef]) -> float:
        return self._copy(records.unpack_tensors(ray.get(refs[0])))

    def load_rdt(self, tensors: dict[str, torch.Tensor]) -> float:
        return self._copy(tensors)

    # Ray 2.60 hangs an RDT transfer to an actor whose class has no RDT method (ray-project/ray#66264):
    # this one is never called.
    @ray.method(tensor_transport="gloo")
    def rdt_receiver(self) -> torch.Tensor:
        return torch.zeros(1)

    def receive_broadcast(self) -> float:
        import torch.distributed as dist

        received = {}
        for name, param in self.weights.items():
            received[name] = torch.empty_like(param)
            dist.broadcast(received[name], src=0)
        return self._copy(received)

    def _copy(self, tensors: dict[str, torch.Tensor]) -> float:
        """Load the version; returns when it was held (before resetting for the next measurement)."""
        for name, param in self.weights.items():
            param.copy_(tensors[name])
        held = time.time()
        assert float(self.weights["w1"][0]) == 1.0  # the version arrived
        for param in self.weights.values():
            param.zero_()  # the next measurement starts without it
        return held


def one_sync(trainer, samplers, how: str) -> float:
    started = time.time()
    if how == "object store":
        refs = ray.get(trainer.put.remote())
        done = ray.get([s.load_ref.remote(refs) for s in samplers])
    elif how == "RDT gloo":
        ref = trainer.tensors.remote()
        done = ray.get([s.load_rdt.remote(ref) for s in samplers])
    else:
        sent = trainer.broadcast.remote()
        done = ray.get([s.receive_broadcast.remote() for s in samplers])
        ray.get(sent)
    return max(done) - started


MODES = ("object store", "gloo broadcast", "RDT gloo")


def measure(mib: float, n: int, repeats: int) -> dict[str, float]:
    """Each way with its own actors (each sets up its own torch.distributed group)."""
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    out = {}
    for how in MODES:
        trainer, samplers = Trainer.remote(mib), [Sampler.remote(mib) for _ in range(n)]
        group = None
        if how == "gloo broadcast":
            port = _free_port()
            ray.get([trainer.join.remote(f"127.0.0.1:{port}", n + 1),
                     *[s.join.remote(f"127.0.0.1:{port}", i + 1, n + 1) for i, s in enumerate(samplers)]])
        elif how == "RDT gloo":
            group = create_collective_group([trainer, *samplers], backend="torch_gloo")
        one_sync(trainer, samplers, how)  # warm-up: connections, first allocation
        out[how] = statistics.median(one_sync(trainer, samplers, how) for _ in range(repeats))
        if group is not None:
            destroy_collective_group(group)
        for actor in (trainer, *samplers):
            ray.kill(actor)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[3.2, 372.0])
    parser.add_argument("--samplers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ray.init(address="local", num_cpus=max(args.samplers) + 2, include_dashboard=False, log_to_driver=False,
             _temp_dir=f"/tmp/ray-weight-sync-{os.getpid()}")
    log.info("| MiB | samplers | object store s | gloo broadcast s | RDT gloo s | broadcast / store | RDT / store |")
    log.info("|---|---|---|---|---|---|---|")
    for mib in args.mib:
        for n in args.samplers:
            t = measure(mib, n, args.repeats)
            store = t["object store"]
            log.info("| %.1f | %d | %.3f | %.3f | %.3f | %.2fx | %.2fx |", mib, n, store, t["gloo broadcast"], t["RDT gloo"],
                     t["gloo broadcast"] / store, t["RDT gloo"] / store)
    ray.shutdown()


if __name__ == "__main__":
    main()
