"""Training the step-aware preference model (SPM) on Ray (DESIGN.md, "The step-aware preference model").

    preference files (Pick-a-Pic parquet, or prompt/image paths/label as parquet, jsonl or csv)
      -> from_items(unit_plan) -> map_batches(read_and_tag)   every epoch's row groups, one epoch after
                                                 another; split, example id, weight, epoch, t (pure functions)
      -> map_batches(X0Renderer, actor pool)             base model: VAE encode, shared noise at t, one CFG
                                                         UNet step -> x0_hat, decode, straight resize to 224
      -> streaming_split -> TorchTrainer + DeepSpeed      SPM scores both at t, cross-entropy, AdamW
    rank 0 -> per-bucket eval accuracy, the released state-dict layout (.bin) and safetensors

The frozen base model lives only in the renderer actors; the trainer holds only the SPM. Every random draw
(t and the noise both images of a pair share) is a pure function of (seed, epoch, example id), so a row
renders the same whichever actor renders it.
"""

from importlib import import_module
from typing import Any

# Names resolved on first use: a Ray Data task that runs ``data.tag_examples`` imports this package,
# and should not pay for diffusers, DeepSpeed and MLflow (the driver's and renderer's imports).
_EXPORTS = {
    "config": ("SPMConfig", "load_spm_config", "spm_config_from_dict", "validate_spm_config"),
    "data": ("PreferenceDataError", "PreferenceSource", "bucket_of", "inspect_preferences", "tag_examples"),
    "driver": ("run_spm_training",),
    "render": ("X0Renderer", "decode_image", "relabel_from_scores", "render_x0_pairs", "resize_straight"),
    "trainer": ("pair_cross_entropy", "preference_loss"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
