"""Training the step-aware preference model (SPM) on Ray (DESIGN.md, "The step-aware preference model").

    preference files (Pick-a-Pic parquet, or prompt/image paths/label as parquet, jsonl or csv)
      -> Ray Data read -> map_batches(tag_examples)      split, example id, weight, epoch, t (pure functions)
      -> map_batches(X0Renderer, actor pool)             base model: VAE encode, shared noise at t, one CFG
                                                         UNet step -> x0_hat, decode, straight resize to 224
      -> streaming_split -> TorchTrainer + DeepSpeed      SPM scores both at t, cross-entropy, AdamW
    rank 0 -> per-bucket eval accuracy, the released state-dict layout (.bin) and safetensors

The frozen base model lives only in the renderer actors; the trainer holds only the SPM. Every random draw
(t and the noise both images of a pair share) is a pure function of (seed, epoch, example id), so a row
renders the same whichever actor renders it.
"""

from spo_ray.spm_training.config import SPMConfig, load_spm_config, spm_config_from_dict, validate_spm_config
from spo_ray.spm_training.data import (
    PreferenceDataError,
    PreferenceSource,
    bucket_of,
    inspect_preferences,
    tag_examples,
)
from spo_ray.spm_training.driver import run_spm_training
from spo_ray.spm_training.render import (
    X0Renderer,
    decode_image,
    relabel_from_scores,
    render_x0_pairs,
    resize_straight,
)
from spo_ray.spm_training.trainer import pair_cross_entropy, preference_loss

__all__ = [
    "PreferenceDataError", "PreferenceSource", "SPMConfig", "X0Renderer", "bucket_of", "decode_image",
    "inspect_preferences", "load_spm_config", "pair_cross_entropy", "preference_loss", "relabel_from_scores",
    "render_x0_pairs", "resize_straight", "run_spm_training", "spm_config_from_dict", "tag_examples",
    "validate_spm_config",
]
