"""Randomness as a pure function of ids.

Every random draw in SPO (initial noise, candidate noise, which candidate continues, pair
shuffles) is keyed by (seed, epoch, prompt id, step, candidate, ...), never by which actor ran
it or in what order. This is what makes the in-process and Ray engines agree and resume exact.
Draws happen on the CPU so they do not depend on the device either.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*key: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from ``key``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*key))


def randn(shape: tuple[int, ...], *key: int | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` keyed by ``key`` (CPU, float32 drawn, then cast)."""
    return torch.randn(shape, generator=generator(*key), dtype=torch.float32, device="cpu").to(dtype)


def randint(high: int, *key: int | str) -> int:
    """A uniform integer in [0, high) keyed by ``key``."""
    return int(torch.randint(high, (1,), generator=generator(*key)).item())


def permutation(n: int, *key: int | str) -> torch.Tensor:
    """A uniform permutation of range(n) keyed by ``key``."""
    return torch.randperm(n, generator=generator(*key), device="cpu")
