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

Import from the modules (config, data, render, trainer, driver): the package itself imports nothing,
so a Ray Data read task that runs ``data.read_and_tag`` does not load diffusers, DeepSpeed and MLflow
(its import: 2.8 s -> 1.1 s here, `python -X importtime -c "import spo_ray.spm_training.data"`).
"""
