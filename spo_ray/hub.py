"""Model folders from the Hugging Face hub, for the settings that take a folder or a hub id (the
scorer's CLIP / PickScore and its processor, the evaluation's CLIP models).

The cache comes first (``HF_HOME`` / ``HF_HUB_CACHE``: on a cluster the shared ``/models/hf``
volume, filled once), the network only on a miss; only configs, tokenizer files and safetensors
weights are fetched (``pytorch_model.bin`` only for a repository without safetensors; transformers
reads it with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` (cache first, then the network); FileNotFoundError naming
    the repository when neither has it."""
    from huggingface_hub import snapshot_download

    errors = []
    for local_only in (True, False):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=FILES, local_files_only=local_only))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated, no cache: all read as "not available"
            errors.append(f"{type(err).__name__}: {err}")
            continue
        has_config = (folder / "config.json").is_file()
        if has_config and not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"], local_files_only=local_only))
        return folder
    raise FileNotFoundError(f"{repo_id}: no such local directory, and the hub copy is not available "
                            f"({errors[-1]}); download it once (huggingface-cli download {repo_id}) into the "
                            "HF cache, or pass a local directory")
