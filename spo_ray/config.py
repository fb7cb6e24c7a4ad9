"""Typed configuration: presets (YAML data), then a user YAML file, then dotted overrides.

    cfg = load_config("sd15", config_file="my.yaml", overrides=["train.learning_rate=1e-5"])

Unknown keys and impossible values are errors that name the key, raised before any model,
cluster or tracking resource is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""



@dataclass
class ModelConfig:
    kind: str = "sd15"  # "sd15" | "sdxl"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local diffusers dir, hub id, or tiny:<kind>
    vae: str | None = None  # a separate VAE (SDXL: the fp16-fix VAE)
    resolution: int | None = None  # pixels; None = the UNet's native size
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    # The GPU fast path (null = on where the role runs on a GPU): channels-last UNet/VAE memory
    # layout, and torch.compile of the samplers' UNet (the only UNet that just runs inference: the
    # renderer toggles its LoRA, the trainer's is wrapped by DeepSpeed).
    channels_last: bool | None = None
    compile_unet: bool | None = None


@dataclass
class SamplingConfig:
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    divert_start_step: int = 4  # steps before this index are plain single-sample DDIM steps
    pool_size: int = 4  # k candidates per branching step
    num_inner_steps: int = 0  # SDXL: single-sample steps each candidate runs before scoring
    prompts_per_round: int = 40  # prompts per round, the whole round (split across the Ray engine's samplers)


@dataclass
class ScorerConfig:
    type: str = "spm"  # "spm" | "clip" | "brightness" | "package.module:Class"
    clip_dir: str | None = None  # PickScore (CLIP) weights: a folder, a hub id, or "tiny"
    # Its tokenizer / preprocessor (CLIP-ViT-H-14 for PickScore) when clip_dir lacks them: a folder or hub id.
    processor_dir: str | None = None
    checkpoint: str | None = None  # SPM state dict (.bin/.pt with weights_only, or .safetensors)
    threshold: float = 0.3  # keep a pair when softmax([s_w, s_l]) gap > threshold
    max_batch: int = 64  # images per scorer forward
    # Pools with a non-finite score (or x0_hat) are dropped and counted; beyond this fraction of a
    # round's pools the run stops with a checkpoint and a message saying where they came from.
    max_nonfinite_fraction: float = 0.01
    # The SPM / CLIP scorer's weights and compute: fp32 as the reference ran its SPM, whatever the
    # model dtype; "bf16" / "fp16" trade keep decisions for speed (docs/fidelity.md measures it).
    dtype: str = "fp32"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for a user scorer class


@dataclass
class TrainConfig:
    lora: bool = True  # False = full fine-tuning
    lora_rank: int = 4
    lora_alpha: int | None = None  # None = lora_rank (the paper: rank = alpha)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    learning_rate: float = 6e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0
    train_batch_size: int = 40  # transition pairs per micro-batch, across all trainer ranks (a global number)
    grad_accum_steps: int = 1
    beta: float = 10.0
    clip_eps: float = 0.1
    # The reference configures 1.0 but never clips (its clip call gets a spent iterator); the
    # paper's numbers come from no clipping, so the paper presets set null.
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    epochs: int = 10
    seed: int = 42
    max_nonfinite_steps: int = 5  # this many non-finite steps in a row stop the run
    test_delay_s: float = 0.0  # test only: sleep per optimizer step to slow the trainer


@dataclass
class DataConfig:
    prompt_file: str = "demo"  # path to .txt/.json/.jsonl/.csv/.parquet, or "demo" for the shipped set
    max_prompts: int | None = 4000


@dataclass
class RoleResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources (KubeRay groups)
    # torch intra-op threads in each of the role's processes; None = ray.torch_threads_per_actor.
    # On a shared CPU node give each role threads in proportion to its share of the work.
    torch_threads: int | None = None

    def problems(self, name: str) -> list[str]:
        """What is wrong with this role's request (``name``: its config path, e.g. ``ray.sampler``)."""
        checks = [
            (self.num_cpus >= 0 and self.num_gpus >= 0, f"{name} resources must be >= 0"),
            (self.torch_threads is None or self.torch_threads >= 1,
             f"{name}.torch_threads must be >= 1 or null, got {self.torch_threads}"),
            (self.num_gpus <= 1 or float(self.num_gpus).is_integer(),
             f"{name}.num_gpus above 1 must be a whole number, got {self.num_gpus}"),
        ]
        return [message for ok, message in checks if not ok]

    def ray_options(self) -> dict[str, Any]:
        """The role's request as Ray ``.options()`` / ``map_batches`` keyword arguments."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


@dataclass
class RayConfig:
    address: str | None = None  # None = connect to the cluster the job runs in, else start local
    num_samplers: int = 1
    num_scorers: int = 1
    num_trainers: int = 1
    max_policy_lag: int = 1  # rounds; 0 = the reference's synchronous schedule
    zero_stage: int = 2
    offload_optimizer: bool = False
    sampler: RoleResources = field(default_factory=RoleResources)
    scorer: RoleResources = field(default_factory=RoleResources)
    trainer: RoleResources = field(default_factory=RoleResources)
    # The validation-grid renderer (one actor: policy UNet + text encoders + VAE), used only when
    # tracking is on; it renders once per epoch, so a CPU or a GPU fraction is usually enough.
    renderer: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0))
    torch_threads_per_actor: int | None = None
    max_failures: int = 3  # trainer worker-group restarts (from the latest checkpoint) before the run fails


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI, else sqlite in the run directory
    experiment: str = "spo-ray"
    log_pair_images_every: int = 0  # rounds; 0 = never
    # A validation grid every N rounds and at the end (MLflow image key "validation", at the
    # round's step); None = about 20 per run (every ceil(rounds / 20)); 0 = only at the end.
    validation_every_rounds: int | None = None
    validation_prompts: list[str] = field(default_factory=list)  # empty = the first 4 prompts of the set
    register_model: str | None = None  # a registered model name: the final LoRA becomes a new version
    # Every checkpoint's path and file hashes are logged (a small JSON); its files are uploaded only
    # every N-th checkpoint (0 = never): a full SDXL checkpoint is ~31 GB.
    upload_checkpoints_every: int = 0
    system_metrics: bool = True  # MLflow's system/* metrics (CPU, memory, disk, network, GPU)


@dataclass
class RunConfig:
    name: str = "spo"
    output_dir: str = "runs"  # made absolute at load time (job working dirs are temporary)
    checkpoint_every_rounds: int = 10  # 0 = only at the end
    keep_checkpoints: int = 3
    max_rounds: int | None = None  # stop early (demos, tests)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    progress: bool = True
    # "auto": continue from the run's latest checkpoint, if any; "never": a fresh run (a run
    # directory that already holds a run is an error); a checkpoint folder: start from it (a fork
    # of another run; once this run has checkpoints of its own, a re-submission continues those).
    resume: str = "auto"


class ConfigRoot:
    """What every top-level config (SPO training, evaluation, SPM training) shares."""

    run: Any

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


@dataclass
class SPOConfig(ConfigRoot):
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------- loading


PRESET_KINDS = {"eval-": "eval", "spm-": "spm"}  # name prefix -> what the preset configures; else "spo"


def preset_kind(name: str) -> str:
    return next((kind for prefix, kind in PRESET_KINDS.items() if name.startswith(prefix)), "spo")


def available_presets(kind: str = "spo") -> list[str]:
    """The shipped presets of one kind: "spo" (training), "eval" or "spm" (SPM training)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if preset_kind(p.stem) == kind)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not a silent overwrite."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _type_matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_matches(v, item) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(annotation) or (Any, Any)
        return isinstance(value, dict) and all(
            _type_matches(k, key_t) and _type_matches(v, val_t) for k, v in value.items()
        )
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _coerce_float(value: Any, annotation: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string and ``1`` as an int: accept both where a float is meant."""
    accepts_float = annotation is float or float in typing.get_args(annotation)
    if not accepts_float or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str, problems: list[str] | None = None) -> None:
    """Set fields of dataclass ``obj`` from ``data``, recursing into nested dataclasses. Problems
    (unknown keys, wrong types, non-finite floats) go to ``problems`` when given, so that a loader
    reports them all at once; without it the first one raises."""
    collect = problems is not None
    problems = problems if collect else []
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            problems.append(f"unknown config key '{dotted}'{hint}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"config key '{dotted}' must be a mapping, got {value!r}")
            else:
                _merge(current, value, dotted + ".", problems)
            continue
        annotation = hints[key]
        value = _coerce_float(value, annotation)
        if not _type_matches(value, annotation):
            type_name = getattr(annotation, "__name__", str(annotation))
            problems.append(f"config key '{dotted}' expects {type_name}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"config key '{dotted}' must be a finite number, got {value!r}")
        else:
            setattr(obj, key, value)
    if problems and not collect:
        raise ConfigError(problems[0])


def _override_to_dict(override: str) -> dict[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{dotted.strip()}': the value {raw!r} is not valid YAML ({err.problem})") from err
    nested: dict[str, Any] = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


COMMANDS = {"spo": "spo-ray train", "eval": "spo-ray evaluate", "spm": "spo-ray train-spm"}


def layer_config(
    cfg: Any,
    kind: str,
    preset: str | None,
    config_file: str | Path | None,
    overrides: list[str] | None,
    *,
    accumulate: tuple[str, ...] = (),
) -> Any:
    """Merge into the config dataclass ``cfg``: the preset of ``kind`` (a name or a YAML path),
    then a YAML file, then dotted overrides; make ``run.output_dir`` absolute. An override of a
    mapping named in ``accumulate`` (``tuned.NAME=PATH``) adds one entry instead of replacing it."""
    problems: list[str] = []
    if preset:
        path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            label = {"spo": "", "eval": "evaluation ", "spm": "SPM "}[kind]
            raise ConfigError(f"unknown {label}preset '{preset}' (available: {', '.join(available_presets(kind))})")
        if path.parent == PRESET_DIR and preset_kind(path.stem) != kind:
            raise ConfigError(f"preset '{preset}' is not for `{COMMANDS[kind]}`: it is for `{COMMANDS[preset_kind(path.stem)]}`")
        _merge(cfg, _read_yaml(path), "", problems)
        cfg.preset = path.stem
    if config_file:
        _merge(cfg, _read_yaml(Path(config_file)), "", problems)
    for override in overrides or []:
        try:
            data = _override_to_dict(override)
        except ConfigError as err:
            problems.append(str(err))
            continue
        (key,) = data
        if key in accumulate and isinstance(data[key], dict):
            data = {key: {**getattr(cfg, key), **data[key]}}
        scorer_before = getattr(getattr(cfg, "scorer", None), "type", None)
        _merge(cfg, data, "", problems)
        if scorer_before is not None and cfg.scorer.type != scorer_before and "kwargs" not in data.get("scorer", {}):
            cfg.scorer.kwargs = {}  # another scorer: the preset's arguments (the brightness scale) do not carry over
    if problems:  # every unknown key, bad type and unparsable value at once
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    return cfg


def load_config(
    preset: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    validate: bool = True,
) -> SPOConfig:
    """Preset, then YAML file, then dotted overrides; validated. ``preset`` may be a YAML path."""
    cfg = layer_config(SPOConfig(), "spo", preset, config_file, overrides)
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], *, validate: bool = True) -> SPOConfig:
    """Rebuild a config from ``to_dict()`` output (e.g. shipped to a Ray worker or a checkpoint)."""
    cfg = SPOConfig()
    _merge(cfg, data, "")
    if validate:
        validate_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def common_problems(cfg: Any) -> list[str]:
    """What every config kind checks alike: the base model's kind, dtype and resolution, the run's
    name (a plain directory name: no separators, no '.' or '..') and device."""
    m, run = cfg.model, cfg.run
    checks = [
        (m.kind in ("sd15", "sdxl"), f"model.kind must be 'sd15' or 'sdxl', got {m.kind!r}"),
        (m.dtype in ("auto", "fp32", "bf16", "fp16"), f"model.dtype must be auto/fp32/bf16/fp16, got {m.dtype!r}"),
        (m.resolution is None or (m.resolution > 0 and m.resolution % 8 == 0),
         f"model.resolution must be a positive multiple of 8, got {m.resolution}"),
        (isinstance(run.name, str) and bool(_RUN_NAME.match(run.name)) and run.name not in (".", ".."),
         f"run.name must be a plain name (letters, digits, '.', '_', '-'; not '.' or '..'), got {run.name!r}"),
        (run.device in ("auto", "cpu", "cuda"), f"run.device must be auto/cpu/cuda, got {run.device!r}"),
    ]
    return [message for ok, message in checks if not ok]


def validate_config(cfg: SPOConfig) -> None:
    """Raise ConfigError listing every impossible value (all at once, not one per run)."""
    s, t, sc, r = cfg.sampling, cfg.train, cfg.scorer, cfg.ray
    checks: list[tuple[bool, str]] = [
        (s.num_steps >= 2, f"sampling.num_steps must be >= 2, got {s.num_steps}"),
        (s.eta > 0, f"sampling.eta must be > 0 (training needs a stochastic DDIM step), got {s.eta}"),
        (s.guidance_scale >= 1, f"sampling.guidance_scale must be >= 1, got {s.guidance_scale}"),
        (0 <= s.divert_start_step < s.num_steps,
         f"sampling.divert_start_step must be in [0, num_steps={s.num_steps}), got {s.divert_start_step}"),
        (s.pool_size >= 2, f"sampling.pool_size (k) must be >= 2 to form a pair, got {s.pool_size}"),
        (s.num_inner_steps >= 0, f"sampling.num_inner_steps must be >= 0, got {s.num_inner_steps}"),
        (s.prompts_per_round >= 1, f"sampling.prompts_per_round must be >= 1, got {s.prompts_per_round}"),
        (0 <= sc.threshold < 1, f"scorer.threshold must be in [0, 1), got {sc.threshold}"),
        (sc.max_batch >= 1, f"scorer.max_batch must be >= 1, got {sc.max_batch}"),
        (0 <= sc.max_nonfinite_fraction <= 1,
         f"scorer.max_nonfinite_fraction must be in [0, 1], got {sc.max_nonfinite_fraction}"),
        (sc.dtype in ("fp32", "bf16", "fp16"), f"scorer.dtype must be fp32/bf16/fp16, got {sc.dtype!r}"),
        (sc.type in ("spm", "clip", "brightness") or ":" in sc.type,
         f"scorer.type must be spm, clip, brightness or 'package.module:Class', got {sc.type!r}"),
        (sc.type not in ("spm", "clip") or bool(sc.clip_dir),
         f"scorer.clip_dir is required for scorer.type={sc.type!r}"),
        (t.lora_rank >= 1, f"train.lora_rank must be >= 1, got {t.lora_rank}"),
        (t.lora_alpha is None or t.lora_alpha > 0, f"train.lora_alpha must be > 0, got {t.lora_alpha}"),
        (bool(t.lora_targets), "train.lora_targets must not be empty"),
        (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
        (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2 must be in [0, 1)"),
        (t.adam_weight_decay >= 0, f"train.adam_weight_decay must be >= 0, got {t.adam_weight_decay}"),
        (t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {t.adam_epsilon}"),
        (t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}"),
        (t.train_batch_size >= 1, f"train.train_batch_size must be >= 1, got {t.train_batch_size}"),
        (t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}"),
        (t.beta > 0, f"train.beta must be > 0, got {t.beta}"),
        (0 < t.clip_eps < 1, f"train.clip_eps must be in (0, 1), got {t.clip_eps}"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm must be > 0 or null, got {t.max_grad_norm}"),
        (t.mixed_precision in ("auto", "fp32", "bf16"), f"train.mixed_precision must be auto/fp32/bf16, got {t.mixed_precision!r}"),
        (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
        (t.seed >= 0, f"train.seed must be >= 0, got {t.seed}"),
        (t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}"),
        (t.test_delay_s >= 0, f"train.test_delay_s must be >= 0, got {t.test_delay_s}"),
        (cfg.data.max_prompts is None or cfg.data.max_prompts >= 1, f"data.max_prompts must be >= 1 or null, got {cfg.data.max_prompts}"),
        (bool(cfg.data.prompt_file), "data.prompt_file must be set"),
        (r.num_samplers >= 1 and r.num_scorers >= 1 and r.num_trainers >= 1,
         "ray.num_samplers, ray.num_scorers and ray.num_trainers must be >= 1"),
        (r.max_policy_lag >= 0, f"ray.max_policy_lag must be >= 0, got {r.max_policy_lag}"),
        (r.zero_stage in (0, 1, 2, 3), f"ray.zero_stage must be 0, 1, 2 or 3, got {r.zero_stage}"),
        (r.max_failures >= 0, f"ray.max_failures must be >= 0, got {r.max_failures}"),
        (cfg.tracking.log_pair_images_every >= 0,
         f"tracking.log_pair_images_every must be >= 0, got {cfg.tracking.log_pair_images_every}"),
        (cfg.tracking.validation_every_rounds is None or cfg.tracking.validation_every_rounds >= 0,
         f"tracking.validation_every_rounds must be >= 0 or null, got {cfg.tracking.validation_every_rounds}"),
        (cfg.tracking.upload_checkpoints_every >= 0,
         f"tracking.upload_checkpoints_every must be >= 0, got {cfg.tracking.upload_checkpoints_every}"),
        (cfg.run.checkpoint_every_rounds >= 0, f"run.checkpoint_every_rounds must be >= 0, got {cfg.run.checkpoint_every_rounds}"),
        (cfg.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {cfg.run.keep_checkpoints}"),
        (cfg.run.max_rounds is None or cfg.run.max_rounds >= 1, f"run.max_rounds must be >= 1 or null, got {cfg.run.max_rounds}"),
    ]
    problems = common_problems(cfg) + [message for ok, message in checks if not ok]
    for role in ("sampler", "scorer", "trainer", "renderer"):
        problems += getattr(r, role).problems(f"ray.{role}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def role_threads(ray_config: Any, role: str) -> int | None:
    """Torch intra-op threads for one role's processes: ``<ray>.<role>.torch_threads``, else the
    section's ``torch_threads_per_actor``, else None (torch's default). For every config kind."""
    return getattr(ray_config, role).torch_threads or ray_config.torch_threads_per_actor
