"""Images a run shows: validation grids (base row above the current policy, fixed prompts and
seeds) and win/lose strips of scored pairs, rendered next to sampling (they run diffusion and the
VAE), handed to tracking as PIL images or PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spo_ray.config import SPOConfig


def to_uint8(images: Any) -> np.ndarray:
    """[N, 3, H, W] tensor/array in [-1, 1] -> uint8 [N, H, W, 3]."""
    import torch

    if torch.is_tensor(images):
        images = images.detach().float().cpu().numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    array = (np.clip(array, -1.0, 1.0) + 1.0) * 127.5
    return np.round(array).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images: Any, nrow: int, *, padding: int = 2, fill: int = 255) -> Any:
    """A PIL grid of ``images`` ([N, 3, H, W] in [-1, 1]), ``nrow`` images per row (as torchvision).

    Size: ``(ncol * (W + padding) + padding, rows * (H + padding) + padding)`` with ncol = min(nrow, N).
    """
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    ncol = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / ncol))
    grid = Image.new("RGB", (ncol * (w + padding) + padding, rows * (h + padding) + padding), (fill,) * 3)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid.paste(Image.fromarray(pixels[i]), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def pair_strip(
    win_images: Any,
    lose_images: Any,
    score_win: Sequence[float],
    score_lose: Sequence[float],
    timesteps: Sequence[int],
    *,
    padding: int = 2,
) -> Any:
    """Winners in a row above their losers, each labelled ``t=<scored t> s=<score>`` underneath."""
    from PIL import Image, ImageDraw, ImageFont

    win, lose = to_uint8(win_images), to_uint8(lose_images)
    n, h, w, _ = win.shape
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def label(t: Any, s: Any) -> str:
        return f"t={int(t)} s={float(s):.2f}"

    labels = [[label(t, s) for t, s in zip(timesteps, scores, strict=True)] for scores in (score_win, score_lose)]
    boxes = [probe.textbbox((0, 0), text, font=font) for row in labels for text in row]
    text_w = max((b[2] - b[0] for b in boxes), default=0)
    text_h = max((b[3] for b in boxes), default=10)
    cell_w, cell_h = max(w, text_w + 2), h + text_h + 3
    strip = Image.new("RGB", (n * (cell_w + padding) + padding, 2 * (cell_h + padding) + padding), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, (pixels, row_labels) in enumerate(((win, labels[0]), (lose, labels[1]))):
        for i in range(n):
            x, y = padding + i * (cell_w + padding), padding + r * (cell_h + padding)
            strip.paste(Image.fromarray(pixels[i]), (x + (cell_w - w) // 2, y))
            draw.text((x + 1, y + h + 1), row_labels[i], fill=(0, 0, 0), font=font)
    return strip


GRIDS_PER_RUN = 20  # validation_every_rounds=None: about this many grids over a run


def validation_due(every: int | None, position: int, end: int) -> bool:
    """Whether the round that brought the run to ``position`` (of ``end``) renders a validation
    grid: every ``every`` rounds (None: about GRIDS_PER_RUN over the run; 0: never here, only
    the end of the run renders one)."""
    if every is None:
        every = max(1, math.ceil(end / GRIDS_PER_RUN))
    return every > 0 and position % every == 0


def validation_set(cfg: SPOConfig, prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The fixed validation prompts (configured, else the first 4 of the set) and their seeds."""
    chosen = list(cfg.tracking.validation_prompts) or list(prompts[:4])
    return chosen, list(range(len(chosen)))


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes (how rendered images travel between Ray actors)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_validation_grid(
    model: Any,
    frozen_copy: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling_cfg: Any,
    *,
    base_images: Any = None,
) -> tuple[Any, Any]:
    """(grid, base images): the base model's images (LoRA disabled / the frozen copy) in a row
    above the current policy's, for fixed prompts and seeds (same noise). ``base_images`` from
    an earlier call skips re-rendering the base row, which never changes."""
    import torch

    from spo_ray.sampling import generate_latents
    from spo_ray.training import reference_unet

    was_training = model.unet.training
    model.unet.eval()
    try:
        with torch.no_grad():
            if base_images is None:
                with reference_unet(model.unet, frozen_copy) as ref:
                    base_images = model.decode(generate_latents(model, list(prompts), list(seeds), cfg=sampling_cfg, unet=ref))
                base_images = base_images.float().cpu()
            current = model.decode(generate_latents(model, list(prompts), list(seeds), cfg=sampling_cfg)).float().cpu()
    finally:
        model.unet.train(was_training)
    return image_grid(torch.cat([base_images, current]), nrow=len(prompts)), base_images


def render_pair_strip(model: Any, records: Mapping[str, Any], pairs: Mapping[str, Any], max_pairs: int = 4) -> Any:
    """The first ``max_pairs`` kept pairs of a round as the scorer saw them: the winner's and the
    loser's x0_hat (from the trajectory records), decoded, with the scored t and the scores."""
    import torch

    n = min(max_pairs, len(pairs["pair_id"]))
    row_of = {int(pid): b for b, pid in enumerate(records["prompt_id"].tolist())}
    win, lose = [], []
    for i in range(n):
        b = row_of[int(pairs["prompt_id"][i])]
        s = records["seg_start"][b].tolist().index(int(pairs["seg_start"][i]))
        win.append(records["x0_hat"][b, s, int(pairs["win_idx"][i])])
        lose.append(records["x0_hat"][b, s, int(pairs["lose_idx"][i])])
    with torch.no_grad():
        images = model.decode(torch.stack(win + lose)).float().cpu()
    return pair_strip(
        images[:n], images[n:], pairs["score_win"][:n].tolist(), pairs["score_lose"][:n].tolist(),
        pairs["score_t"][:n].tolist(),
    )
