"""Transitions routed, not gathered: each trainer rank receives only the transition rows its
micro-batches use.

A round's kept pairs arrive at the ranks wherever ``streaming_split`` put them. Then:

1. every rank all-gathers the round's metadata: (pair id, segment length, policy version) of the
   pairs it holds, ~24 bytes a pair;
2. from the metadata alone every rank computes the same canonical order (pair ids sorted, each
   pair expanded into its transitions) and the same micro-batch plan (``plan_microbatches``, a
   pure function of ids), hence each rank's share of the round's transitions
   (``transition_shares``; a rank with no share gets one transition for its zero-weight forward);
3. each rank expands the pairs it holds into transition rows, ``ray.put``s one object per
   destination holding exactly the rows that rank trains on and posts the references to the
   RoundLedger (~250 bytes each: the data stays in the sender's object store), then takes the
   ones addressed to it and fetches them peer to peer.

So the training is exactly the gathered version's (the same micro-batches, in the same order),
while the bytes a rank receives are its share of the round's transitions, O(round / ranks).

Why transitions and not pairs: the micro-batch shuffle scatters a pair's transitions over the
ranks, so with segments of several transitions (SDXL's inner steps: 4) whole pairs would follow
every rank that needs one of them: at the SDXL preset's round (16 pairs, 64 transitions,
micro-batches of 8) the busiest rank needs 100% / 81% / 50% of the pairs at 2 / 4 / 8 ranks, and
only 12.5% of the transitions at 8. A transition row travels as 4 latents, 3 for a segment's
first transition, and the conditioning once per prompt among the rows an object holds
(``_packed``). Per rank and round (the busiest, from ``transition_shares`` at each case's round:
``spo-ray bench --scale``): (A) SD1.5 LoRA, 320 transitions on 4 ranks: 20.5 MB (25.2 MB with
the conditioning per row, as routing whole pairs); (B) and (C) SDXL, 64 transitions on 8 ranks:
10.6 MB instead of 21.4 MB (whole pairs) or 42.8 MB (the round gathered on every rank). Routing CPU per rank: the metadata all-gather, one
expand of the pairs it holds, one put per destination (measured in the scale bench).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch

from spo_ray import records
from spo_ray.learner import RoundRows, local_rows, plan_microbatches
from spo_ray.scoring import prompt_of_pair
from spo_ray.training import expand_transitions, take_rows


@dataclass
class RoutedRound:
    """This rank's view of a round: its rows, and the round's totals every rank knows."""

    rows: RoundRows
    pair_ids: list[int]  # every pair of the round, sorted
    transitions: int
    min_policy_version: int | None
    bytes_received: int  # transition bytes fetched from other ranks this round
    transitions_held: int  # transition rows this rank holds (its share, or one for a zero-weight forward)


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def transition_shares(total: int, *, world: int, batch_size: int, seed: int, epoch: int,
                      round_index: int) -> list[torch.Tensor]:
    """The global transition indices each rank trains on in a round of ``total`` transitions
    (rank r takes every world-th row of each global micro-batch); a rank without a share gets
    transition 0, which it needs for its zero-weight forward. A pure function of ids."""
    plan = plan_microbatches(total, batch_size, seed=seed, epoch=epoch, round_index=round_index)
    shares = []
    for r in range(world):
        share = torch.cat([local_rows(m, r, world) for m in plan]) if plan else torch.zeros(0, dtype=torch.long)
        shares.append(share if share.numel() else torch.zeros(1, dtype=torch.long))
    return shares


def route_round(local: list[dict[str, Any]], *, rank: int, world: int, batch_size: int, seed: int, epoch: int,
                round_index: int, exchange: Any) -> RoutedRound:
    """Exchange a round's transitions so that this rank holds exactly what its micro-batches use;
    ``exchange`` is the run's RoundLedger, which hands each rank the references addressed to it."""
    mine = records.concat(local) if local else {}
    n_mine = records.num_rows(mine) if mine else 0
    meta = [(int(p), int(s), int(v)) for p, s, v in zip(
        mine["pair_id"].tolist(), mine["seg_len"].tolist(), mine["policy_version"].tolist(), strict=True)] if n_mine else []
    ordered = sorted((pid, seg, ver) for part in _all_gather(meta) for pid, seg, ver in part)
    if not ordered:
        return RoutedRound(RoundRows(0, take=lambda idx: {}, any_row=lambda: {}), [], 0, None, 0, 0)

    # The canonical transitions: pair k's transitions are offsets[k] .. offsets[k] + seg_len - 1.
    lengths = torch.tensor([seg for _, seg, _ in ordered])
    offsets = dict(zip((pid for pid, _, _ in ordered), (torch.cumsum(lengths, 0) - lengths).tolist(), strict=True))
    total = int(lengths.sum())
    shares = transition_shares(total, world=world, batch_size=batch_size, seed=seed, epoch=epoch,
                               round_index=round_index)

    def global_index(rows: dict[str, Any]) -> torch.Tensor:
        return torch.tensor([offsets[p] for p in rows["pair_id"].tolist()], dtype=torch.long) + rows["transition"].cpu()

    # This rank's transitions, and where each global transition sits among them (-1: elsewhere).
    expanded = expand_transitions(mine) if n_mine else {}
    n_expanded = len(expanded["pair_id"]) if n_mine else 0
    row_of = torch.full((total,), -1, dtype=torch.long)
    if n_mine:
        row_of[global_index(expanded)] = torch.arange(n_expanded)
    wanted_here = [row_of[share][row_of[share] >= 0] for share in shares]
    # Each rank sends every other rank the transitions it trains on, as one object per destination.
    outgoing = {dest: ray.put(_packed(take_rows(expanded, idx))) for dest, idx in enumerate(wanted_here)
                if dest != rank and idx.numel()}
    # References travel through a coordination actor, not the all-gather: passed through Ray they
    # keep their owner's address and are reference-counted (pickled by torch they are neither,
    # and a small object held in its owner's memory is then never found).
    ray.get(exchange.post_pairs.remote(round_index, rank, {dest: [ref] for dest, ref in outgoing.items()}))
    _all_gather(None)  # every rank has posted
    refs = [held[0] for held in ray.get(exchange.take_pairs.remote(round_index, rank))]
    fetched = ray.get(refs) if refs else []
    received = [_unpacked(rows) for rows in fetched]
    own = wanted_here[rank]
    # All of its own rows (one rank): the expanded round itself, not a copy of it.
    own_rows = [] if not own.numel() else [expanded if own.numel() == n_expanded else take_rows(expanded, own)]
    parts = own_rows + received
    held = parts[0] if len(parts) == 1 else records.concat(parts)
    n_held = len(held["pair_id"])

    # Global transition index -> this rank's row.
    local_index = torch.full((total,), -1, dtype=torch.long)
    local_index[global_index(held)] = torch.arange(n_held)

    def take(global_idx: torch.Tensor) -> dict[str, Any]:
        idx = local_index[global_idx]
        if bool((idx < 0).any()):
            raise RuntimeError(f"round {round_index}: rank {rank} was asked for a transition it was not sent")
        return take_rows(held, idx)

    return RoutedRound(
        rows=RoundRows(total, take=take, any_row=lambda: take_rows(held, torch.zeros(1, dtype=torch.long))),
        pair_ids=[pid for pid, _, _ in ordered], transitions=total,
        min_policy_version=min(ver for _, _, ver in ordered),
        bytes_received=sum(telemetry_bytes(b) for b in fetched), transitions_held=n_held,
    )


def _packed(rows: dict[str, Any]) -> dict[str, Any]:
    """Transition rows for transport: a segment's first transition starts both candidates at the
    shared x_t (lose_in equals win_in exactly), so lose_in travels for the other rows only (a
    one-transition pair's row then costs what the pair does: x_t and two outputs); the
    conditioning travels once per prompt among the rows (``records.share_conditioning``)."""
    rows = records.share_conditioning(rows, prompt_of_pair(rows["pair_id"]))
    return {**rows, "lose_in": rows["lose_in"][~rows["shared"]]}


def _unpacked(rows: dict[str, Any]) -> dict[str, Any]:
    lose_in = rows["win_in"].clone()
    lose_in[~rows["shared"]] = rows["lose_in"]
    return records.unshare_conditioning({**rows, "lose_in": lose_in})


def telemetry_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a torch pair batch's tensors (what crossed the object store)."""
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
