"""The one entry for every command and job: parse ``--preset/--config/overrides``, load and check
the config of its kind, run it, and turn a user error into one line and exit status 2.

    jobs/spo_sdxl.py:    sys.exit(job_main("spo", "sdxl"))
    jobs/evaluate.py:    sys.exit(job_main("eval", "eval-paper"))
    jobs/train_spm.py:   sys.exit(job_main("spm", "spm-sd15"))
    spo-ray train / evaluate / train-spm  (spo_ray/cli.py)

Exit status: 0 done; 1 accounting problems; 2 a user error (config, inputs, checkpoint, tracking
server: one line ``spo-ray: <what>``, before the cluster is asked for anything; the traceback with
``--debug``); 3 stopped by non-finite values (after a checkpoint); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any

from spo_ray.config import ConfigError, available_presets

log = logging.getLogger(__name__)

KINDS = {"spo": "SPO training", "eval": "evaluation", "spm": "step-aware preference model training"}
# One real field per config kind, so each command's help shows an override it accepts.
OVERRIDE_EXAMPLES = {"spo": "train.learning_rate=1e-5", "eval": "sampling.num_steps=20", "spm": "train.epochs=2"}


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None, kind: str = "spo") -> None:
    """--preset, --config and dotted overrides of one config kind (spo / eval / spm presets)."""
    parser.add_argument("--preset", default=default_preset, help=f"one of {', '.join(available_presets(kind))}, or a YAML path")
    parser.add_argument("--config", default=None, help="a YAML file applied on top of the preset")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {OVERRIDE_EXAMPLES[kind]}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every input check (files, models, checkpoints, tracking server) and exit, "
                             "without taking cluster resources")
    parser.add_argument("--debug", action="store_true", help="the full traceback of a user error, too")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix (each names the setting, file or server)."""
    from spo_ray.checkpointing import CheckpointError
    from spo_ray.evaluation import EvalInputError
    from spo_ray.preflight import InputError
    from spo_ray.prompts import PromptFileError
    from spo_ray.spm_training.data import PreferenceDataError
    from spo_ray.tracking import TrackingError

    return ConfigError, InputError, PromptFileError, EvalInputError, PreferenceDataError, TrackingError, CheckpointError


def load(kind: str, args: argparse.Namespace) -> Any:
    """The validated config of ``kind`` from parsed arguments."""
    if kind == "eval":
        from spo_ray.evaluation import load_eval_config

        return load_eval_config(args.preset, config_file=args.config, overrides=args.overrides)
    if kind == "spm":
        from spo_ray.spm_training.config import load_spm_config

        return load_spm_config(args.preset, config_file=args.config, overrides=args.overrides)
    from spo_ray.config import load_config

    return load_config(args.preset, config_file=args.config, overrides=args.overrides)


def execute(kind: str, cfg: Any, engine: str = "ray") -> dict[str, Any]:
    """Run a loaded config: SPO on Ray or in process, an evaluation, or SPM training (both on Ray)."""
    if kind == "eval":
        from spo_ray.evaluation import run_evaluation

        return run_evaluation(cfg)
    if kind == "spm":
        from spo_ray.spm_training.driver import run_spm_training

        return run_spm_training(cfg)
    if engine == "in-process":
        from spo_ray.local_engine import run_in_process

        return run_in_process(cfg)
    from spo_ray.ray.driver import run_on_ray

    return run_on_ray(cfg)


def check(kind: str, cfg: Any, engine: str = "ray") -> None:
    """Every check a run makes before it takes resources (``--dry-run``): inputs, models,
    checkpoints, the tracking server and, on Ray, the round against the world size."""
    if kind == "eval":
        from spo_ray.evaluation.inputs import prepare_evaluation
        from spo_ray.tracking import check_reachable, resolve_tracking_uri

        prepare_evaluation(cfg)
        if cfg.tracking.enabled:
            check_reachable(resolve_tracking_uri(cfg))
    elif kind == "spm":
        from spo_ray.spm_training.data import inspect_splits

        inspect_splits(cfg)
    else:
        from spo_ray.preflight import preflight

        preflight(cfg, ray=engine == "ray")


def run_command(kind: str, args: argparse.Namespace, engine: str = "ray") -> int:
    """Load, run and report; a user error is one line on stderr and exit status 2 (with
    ``--debug`` its traceback too); Ctrl-C is exit status 130."""
    import yaml

    try:
        cfg = load(kind, args)
        if getattr(args, "print_config", False):
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if getattr(args, "dry_run", False):
            check(kind, cfg, engine)
            log.info("dry run: every check passed for %s (%s); nothing was started", cfg.run.name, cfg.run_dir)
            return 0
        result = execute(kind, cfg, engine)
    except user_errors() as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"spo-ray: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spo-ray: interrupted", file=sys.stderr)
        return 130
    if kind != "eval":  # the evaluation prints its table itself
        from spo_ray.run_log import end_of_run_summary

        print(end_of_run_summary(result))
    if result.get("stopped_by"):
        print(f"spo-ray: stopped: {result['stopped_by']}", file=sys.stderr)
        return 130 if result.get("interrupted") else 3
    return 0 if not result.get("accounting_problems") else 1


def job_main(kind: str, default_preset: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/*.py`` (``ray job submit -- python jobs/spo_sdxl.py --preset tiny-sdxl``)."""
    from spo_ray.run_log import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser(description=f"{KINDS[kind]} on a Ray cluster")
    add_config_arguments(parser, default_preset, kind)
    return run_command(kind, parser.parse_args(argv))
