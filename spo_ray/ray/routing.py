"""Pairs routed, not gathered: each trainer rank receives only the pairs its micro-batches use.

A round's kept pairs arrive at the ranks wherever ``streaming_split`` put them. Then:

1. every rank all-gathers the round's metadata: (pair id, segment length, policy version) of the
   pairs it holds, ~24 bytes a pair;
2. from the metadata alone every rank computes the same canonical order (pair ids sorted, each
   pair expanded into its transitions) and the same micro-batch plan (``plan_microbatches``, a
   pure function of ids), hence which pairs each rank needs (those holding a transition of its
   share; a rank with no share gets one pair for its zero-weight forward);
3. each rank ``ray.put``s one object per destination holding exactly the pairs that rank needs
   from it and posts the references to the RoundLedger (~250 bytes each: the data stays in the
   sender's object store), then takes the ones addressed to it and fetches them peer to peer.

So the training is exactly the gathered version's (the same micro-batches, in the same order),
while the bytes a rank receives are its share of the round, O(round / ranks), instead of the
whole round: at (B) SDXL LoRA on 32 ranks, ~1/32 of a round's ~0.4 GB of pairs per rank instead
of all of it, and no unpickling of the whole round on the critical path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch

from spo_ray import records
from spo_ray.learner import RoundRows, local_rows, plan_microbatches
from spo_ray.training import expand_transitions, take_rows


@dataclass
class RoutedRound:
    """This rank's view of a round: its rows, and the round's totals every rank knows."""

    rows: RoundRows
    pair_ids: list[int]  # every pair of the round, sorted
    transitions: int
    min_policy_version: int | None
    bytes_received: int  # pair bytes fetched from other ranks this round
    pairs_held: int  # pairs this rank trains on (its own and received)


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def route_round(local: list[dict[str, Any]], *, rank: int, world: int, batch_size: int, seed: int, epoch: int,
                round_index: int, exchange: Any) -> RoutedRound:
    """Exchange a round's pairs so that this rank holds exactly what its micro-batches use;
    ``exchange`` is the run's RoundLedger, which hands each rank the references addressed to it."""
    mine = records.concat(local) if local else {}
    n_mine = records.num_rows(mine) if mine else 0
    meta = [(int(p), int(s), int(v)) for p, s, v in zip(
        mine["pair_id"].tolist(), mine["seg_len"].tolist(), mine["policy_version"].tolist(), strict=True)] if n_mine else []
    everyone = _all_gather(meta)
    holder = {pid: (r, i) for r, part in enumerate(everyone) for i, (pid, _, _) in enumerate(part)}
    ordered = sorted((pid, seg, ver) for part in everyone for pid, seg, ver in part)
    if not ordered:
        return RoutedRound(RoundRows(0, take=lambda idx: {}, any_row=lambda: {}), [], 0, None, 0, 0)

    # The canonical transitions: pair k's transitions are offsets[k] .. offsets[k] + seg_len - 1.
    lengths = torch.tensor([seg for _, seg, _ in ordered])
    offsets = torch.cumsum(lengths, 0) - lengths
    pair_of = torch.repeat_interleave(torch.arange(len(ordered)), lengths)  # transition -> pair index
    total = int(lengths.sum())
    plan = plan_microbatches(total, batch_size, seed=seed, epoch=epoch, round_index=round_index)
    needs = []
    for r in range(world):
        share = torch.cat([local_rows(m, r, world) for m in plan]) if plan else torch.zeros(0, dtype=torch.long)
        wanted = sorted(set(pair_of[share].tolist())) or [0]  # one pair for a zero-weight forward
        needs.append([ordered[k][0] for k in wanted])

    # Each rank sends every other rank the pairs it needs from it, as one object per destination.
    outgoing: dict[int, ray.ObjectRef] = {}
    for dest, wanted in enumerate(needs):
        idx = [holder[pid][1] for pid in wanted if holder[pid][0] == rank]
        if dest != rank and idx:
            outgoing[dest] = ray.put(take_rows(mine, torch.tensor(idx)))
    # References travel through a coordination actor, not the all-gather: passed through Ray they
    # keep their owner's address and are reference-counted (pickled by torch they are neither,
    # and a small object held in its owner's memory is then never found).
    ray.get(exchange.post_pairs.remote(round_index, rank, {dest: [ref] for dest, ref in outgoing.items()}))
    _all_gather(None)  # every rank has posted
    refs = [held[0] for held in ray.get(exchange.take_pairs.remote(round_index, rank))]
    received = ray.get(refs) if refs else []
    own = [holder[pid][1] for pid in needs[rank] if holder[pid][0] == rank]
    held = records.concat(([take_rows(mine, torch.tensor(own))] if own else []) + received)
    held = records.sort_rows(held, "pair_id")
    transitions = expand_transitions(held)

    # Global transition index -> this rank's row.
    local_index = torch.full((total,), -1, dtype=torch.long)
    position = {pid: k for k, (pid, _, _) in enumerate(ordered)}
    row = 0
    for pid, seg in zip(held["pair_id"].tolist(), held["seg_len"].tolist(), strict=True):
        start = int(offsets[position[pid]])
        local_index[start : start + seg] = torch.arange(row, row + seg)
        row += seg

    def take(global_idx: torch.Tensor) -> dict[str, Any]:
        idx = local_index[global_idx]
        if bool((idx < 0).any()):
            raise RuntimeError(f"round {round_index}: rank {rank} was asked for a transition it was not sent")
        return take_rows(transitions, idx)

    return RoutedRound(
        rows=RoundRows(total, take=take, any_row=lambda: take_rows(transitions, torch.zeros(1, dtype=torch.long))),
        pair_ids=[pid for pid, _, _ in ordered], transitions=total,
        min_policy_version=min(ver for _, _, ver in ordered),
        bytes_received=sum(telemetry_bytes(b) for b in received), pairs_held=records.num_rows(held),
    )


def telemetry_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a torch pair batch's tensors (what crossed the object store)."""
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
