"""The scorer -> trainer and trainer -> trainer hops.

Transition routing (spo_ray/ray/routing.py): every rank holds exactly the transition rows its
micro-batches use, and the bytes a rank receives fall as ranks grow, also when a pair's
segment has several transitions (SDXL's inner steps), which routing whole pairs did not do.
On both hops the conditioning travels once per prompt: prompt rows in the Ray Data stream
(``records.group_by_prompt``), shared among a destination's rows between ranks."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest
import torch

from spo_ray.bench.scale import CASES, case_shares
from spo_ray.learner import local_rows, plan_microbatches
from spo_ray.ray.routing import transition_shares

from .conftest import GCS_PORT


@pytest.mark.parametrize(("total", "batch_size"), [(1, 4), (7, 2), (64, 8), (100, 16)])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_transition_shares_are_the_micro_batch_plan(total, batch_size, world) -> None:
    shares = transition_shares(total, world=world, batch_size=batch_size, seed=3, epoch=1, round_index=5)
    plan = plan_microbatches(total, batch_size, seed=3, epoch=1, round_index=5)
    trained = [torch.cat([local_rows(m, r, world) for m in plan]) for r in range(world)]
    for share, rows in zip(shares, trained, strict=True):
        # a rank's share is its rows of every micro-batch; without any, transition 0 (zero-weight forward)
        assert share.tolist() == (rows.tolist() or [0])
    assert sorted(torch.cat(trained).tolist()) == list(range(total))  # each transition on one rank, once
    # the shares themselves: ranks with rows partition the round; the others hold only transition 0
    with_rows = [s for s, rows in zip(shares, trained, strict=True) if rows.numel()]
    assert sorted(torch.cat(with_rows).tolist()) == list(range(total))
    assert all(s.tolist() == [0] for s, rows in zip(shares, trained, strict=True) if not rows.numel())
    assert max(map(len, with_rows)) - min(map(len, with_rows)) <= len(plan)  # balanced within a row per micro-batch


def test_bytes_per_rank_fall_as_ranks_grow_with_multi_transition_segments() -> None:
    sdxl = next(c for c in CASES if c.name.startswith("B"))  # 16 pairs of 4 transitions, micro-batches of 8
    busiest = {w: case_shares(dataclasses.replace(sdxl, ranks=w)) for w in (1, 2, 4, 8)}
    rows = {w: b[0] for w, b in busiest.items()}
    assert rows == {1: 64, 2: 32, 4: 16, 8: 8}  # O(round / ranks)
    received = [busiest[w][1] for w in (1, 2, 4, 8)]
    assert received == sorted(received, reverse=True) and received[-1] < received[0] / 6
    # Whole pairs would not have fallen so: at 8 ranks the busiest rank touches half the pairs.
    pairs = {w: b[2] for w, b in busiest.items()}
    assert pairs[2] >= 12 and pairs[8] >= 6  # (of the busiest rank by bytes)
    assert busiest[8][1] < pairs[8] * sdxl.pair_bytes / 1.8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(seed: int, pairs_per_prompt: list[int], epoch: int = 0) -> dict:
    """Synthetic pair records as the scorer emits them: each prompt's pairs together (one per
    segment it kept), sharing the prompt's conditioning (bf16) and policy version; segments of
    1-4 transitions, random latents."""
    from spo_ray.scoring import pair_id

    g = torch.Generator().manual_seed(seed)
    m, prompts = 4, len(pairs_per_prompt)
    counts = torch.tensor(pairs_per_prompt, dtype=torch.long)
    prompt = torch.repeat_interleave(torch.arange(prompts) * 3 + 100 * seed, counts)  # sparse ids, unique per seed
    seg = torch.cat([torch.randperm(8, generator=g)[:c] for c in pairs_per_prompt]) if prompts else torch.zeros(0)
    n = len(prompt)
    cond = torch.randn(prompts, 7, 16, generator=g).to(torch.bfloat16)
    return {
        "pair_id": torch.tensor([pair_id(epoch, int(p), int(s)) for p, s in zip(prompt, seg, strict=True)], dtype=torch.long),
        "prompt_id": prompt, "prompt": [f"prompt {int(p)}" for p in prompt], "epoch": torch.full((n,), epoch),
        "round": torch.full((n,), seed), "seg_start": seg.long(),
        "policy_version": torch.repeat_interleave(torch.randint(3, 5, (prompts,), generator=g), counts),
        "seg_len": torch.randint(1, m + 1, (n,), generator=g),
        "timesteps": torch.randint(0, 1000, (n, m), generator=g), "x_t": torch.randn(n, 4, 8, 8, generator=g),
        "win": torch.randn(n, m, 4, 8, 8, generator=g), "lose": torch.randn(n, m, 4, 8, 8, generator=g),
        "score_win": torch.randn(n, generator=g), "score_lose": torch.randn(n, generator=g),
        "cond_prompt_embeds": torch.repeat_interleave(cond, counts, dim=0),
    }


def _round(seed: int) -> dict:
    """A synthetic round: 9 pairs of 4 prompts (3, 1, 2 and 3 pairs)."""
    return _pairs(seed, [3, 1, 2, 3])


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        (torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype) if torch.is_tensor(a[k]) else list(a[k]) == list(b[k])
        for k in a)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import ray
    import torch.distributed as dist

    from spo_ray.ray.coordination import RoundLedger
    from spo_ray.ray.routing import route_round
    from spo_ray.training import round_transitions, take_rows

    torch.set_num_threads(1)
    ray.init(address=f"127.0.0.1:{GCS_PORT}", namespace=f"routing-{port}", log_to_driver=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if rank == 0:  # the owner keeps its handle (the actor lives as long as it does)
        ledger = RoundLedger.options(name="ledger").remote({})
        ray.get(ledger.stop_requested.remote())  # registered and running
    dist.barrier()
    ledger = ray.get_actor("ledger") if rank else ledger
    results = {}
    for round_index, batch_size in enumerate((4, 2, 16)):
        whole = _round(round_index)
        # uneven holdings as streaming_split leaves them: rank 0 none, the last rank most
        holder = torch.tensor([min(1 + i % world, world - 1) if world > 1 else 0 for i in range(9)])
        mine = take_rows(whole, torch.nonzero(holder == rank).flatten())
        routed = route_round([mine] if len(mine["pair_id"]) else [], rank=rank, world=world, batch_size=batch_size,
                             seed=7, epoch=0, round_index=round_index, exchange=ledger)
        share = transition_shares(routed.transitions, world=world, batch_size=batch_size, seed=7, epoch=0,
                                  round_index=round_index)[rank]
        want = take_rows(round_transitions(whole), share)
        got = routed.rows.take(share)
        results[round_index] = {
            "equal": _equal(want, got),
            "held": routed.transitions_held, "share": share.numel(), "bytes": routed.bytes_received,
            "pair_ids": routed.pair_ids, "min_version": routed.min_policy_version,
            "want_pair_ids": sorted(whole["pair_id"].tolist()), "want_min": int(whole["policy_version"].min()),
        }
    dist.barrier()
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    ray.shutdown()


def test_route_round_hands_each_rank_exactly_its_transitions(ray_cluster, tmp_path) -> None:
    """Real gloo ranks and the real RoundLedger on the test cluster: each rank's rows equal the
    gathered round's rows at its share, bit for bit (bf16 conditioning included), with pairs of
    1-4 transitions held unevenly (one rank holds none) and a micro-batch smaller than the world."""
    out, world = str(tmp_path / "routed"), 3
    torch.multiprocessing.spawn(_rank, args=(world, _free_port(), out), nprocs=world, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]  # written by this test's ranks
    for rank, by_round in enumerate(results):
        for round_index, r in by_round.items():
            assert r["equal"], (rank, round_index)
            assert r["held"] == r["share"]  # exactly its share, nothing more
            assert r["pair_ids"] == r["want_pair_ids"] and r["min_version"] == r["want_min"]
    # rank 0 held no pairs: everything it trains on came from the others
    assert all(r["bytes"] > 0 for r in results[0].values())


def test_policy_versions_unpack_without_a_copy() -> None:
    """A published version (records.pack_tensors) unpacks as views of the received buffers, which
    Ray hands out read-only: exact in every dtype, no second copy of the weights per fetch."""
    import numpy as np

    from spo_ray import records

    weights = {"lora.down": torch.randn(4, 8), "unet.conv": torch.randn(3, 5).to(torch.bfloat16)}
    packed = records.pack_tensors(weights)
    received = {k: (d, np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)) for k, (d, a) in packed.items()}
    assert not any(a.flags.writeable for _, a in received.values())  # as from the object store
    got = records.unpack_tensors(received)
    assert all(torch.equal(got[k], weights[k]) and got[k].dtype == weights[k].dtype for k in weights)
    assert all(got[k].data_ptr() == received[k][1].ctypes.data for k in weights)
    assert records.packed_bytes(packed) == 4 * 32 + 2 * 15


def test_prompt_rows_round_trip_exactly_with_the_conditioning_once() -> None:
    from spo_ray import records, telemetry

    for counts in ([3, 1, 2], [2, 2, 2], [1], []):  # ragged, uniform (a dense block), one pair, none
        pairs = _pairs(1, counts)
        rows = records.group_by_prompt(pairs)
        assert len(rows["prompt_id"]) == len(counts)
        cond = "cond_prompt_embeds" + records.BF16_SUFFIX
        assert rows[cond].shape == (len(counts), 7, 16)  # once per prompt, as its bf16 bits
        back = records.to_torch(records.ungroup_prompts(rows))
        assert _equal(back, pairs), counts
        if counts:  # the stream's bytes: the pairs' latents and the conditioning once per prompt
            once = 7 * 16 * 2 + 4 * 8 + len("prompt 100")  # conditioning, 4 int64 ids, the text (ids 100-106)
            assert telemetry.payload_bytes(rows) == telemetry.payload_bytes(records.to_numpy(pairs)) - (
                sum(counts) - len(counts)) * once
            assert telemetry.pair_min_bytes(pairs, 2) == (
                int((1 + 2 * pairs["seg_len"]).sum()) * 4 * 8 * 8 * 4 + len(counts) * 7 * 16 * 2)
    dense = records.group_by_prompt(_pairs(2, [2, 2]))  # Ray Data hands uniform rows as one array
    dense = {k: (np.stack(list(v)) if v.dtype == object and k != "prompt" else v) for k, v in dense.items()}
    assert _equal(records.to_torch(records.ungroup_prompts(dense)), _pairs(2, [2, 2]))
    split = _pairs(3, [2, 1])
    scattered = {k: (v[[0, 2, 1]] if torch.is_tensor(v) else [v[i] for i in (0, 2, 1)]) for k, v in split.items()}
    with pytest.raises(ValueError, match="not contiguous"):
        records.group_by_prompt(scattered)


def test_transition_rows_travel_with_the_conditioning_once_per_prompt() -> None:
    from spo_ray.ray.routing import _packed, _unpacked
    from spo_ray.training import expand_transitions

    rows = expand_transitions(_pairs(4, [3, 1, 2]))
    shuffled = {k: v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))] for k, v in rows.items()}
    packed = _packed(shuffled)
    assert packed["cond_prompt_embeds"].shape[0] == 3  # three prompts among the rows
    assert int((~shuffled["shared"]).sum()) == packed["lose_in"].shape[0]
    assert _equal(_unpacked(packed), shuffled)


def _score_task(batch: dict) -> dict:
    """A stand-in scorer task: task t emits the kept pairs of its prompts, as prompt rows."""
    from spo_ray import records

    counts = {0: [1, 3, 2], 1: [2, 2], 2: [], 3: [4]}[int(batch["task"][0])]
    return records.group_by_prompt(_pairs(int(batch["task"][0]), counts))


def test_prompt_rows_through_ray_data_streaming_split(ray_cluster) -> None:
    """The stream's real path on the test cluster: map_batches emits prompt rows (ragged blocks, a
    uniform one stored as a fixed-shape tensor column, an empty one), streaming_split(2,
    equal=False) hands them to two consumers, which ungroup them into exactly the pairs."""
    import threading

    import ray
    import ray.data

    from spo_ray import records

    ray.init(address=f"127.0.0.1:{GCS_PORT}", namespace="prompt-rows", log_to_driver=False)
    try:
        ds = ray.data.from_items([{"task": t} for t in range(4)], override_num_blocks=4)
        ds = ds.map_batches(_score_task, batch_size=1, batch_format="numpy")
        ds.context.enable_progress_bars = False
        got: list[list[dict]] = [[], []]
        errors: list[BaseException] = []

        def consume(i: int, shard) -> None:
            try:
                for batch in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                    got[i].append(records.to_torch(records.ungroup_prompts(batch)))
            except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(err)

        threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(ds.streaming_split(2, equal=False))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        ray.shutdown()
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads)
    received = records.sort_rows(records.concat([b for part in got for b in part if len(b["pair_id"])]), "pair_id")
    want = records.sort_rows(records.concat([_pairs(t, c) for t, c in enumerate([[1, 3, 2], [2, 2], [], [4]])]), "pair_id")
    assert sorted(received) == sorted(want)
    for key, value in want.items():
        assert _equal({key: received[key]}, {key: value}), key
