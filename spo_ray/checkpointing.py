"""Atomic run checkpoints: written to a temporary folder, then renamed; the last N are kept.

A checkpoint holds the trainable weights (safetensors), the optimizer and lr-schedule state
(torch, loaded with weights_only=True), and ``state.json``: the prompt-plan position (the next
round), policy version, step counters, accounting and the tracking run id. Randomness is a pure
function of ids (rng.py), so no RNG state is needed to resume exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "round-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    *,
    position: int,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint ``round-<position>`` atomically and prune all but the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{position:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    if optimizer is not None:
        torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "position": position}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state, weights, optimizer state or None); a damaged checkpoint is an error naming the file."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        opt_file = path / "optimizer.pt"
        optimizer = torch.load(opt_file, map_location="cpu", weights_only=True) if opt_file.exists() else None
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise RuntimeError(f"checkpoint {path} is unreadable or incomplete: {err}") from err
    return state, weights, optimizer


def trainable_mismatch(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size]) -> str | None:
    """What differs between the trainable parameters' names/shapes and a checkpoint's (None: it fits)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    details = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if names:
            details.append(f"{label} ({len(names)}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return "; ".join(details) or None


def load_trainable_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy saved trainable weights into ``module``; names or shapes that do not fit are an error."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    problem = trainable_mismatch({n: p.shape for n, p in params.items()}, {n: w.shape for n, w in weights.items()})
    if problem:
        raise ValueError(
            f"checkpoint {source} does not fit the model (different LoRA rank/targets or base model?): {problem}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.dtype))


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
