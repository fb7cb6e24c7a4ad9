"""The ``spo-ray`` command line (also ``python -m spo_ray``).

    spo-ray train --preset tiny-sd15 [--config my.yaml] [section.key=value ...]
    spo-ray train --preset tiny-sd15 --engine ray
    spo-ray presets
    spo-ray compare --experiment spo-ray [--runs ID ...] [--tracking-uri URI] [--out DIR] [--metrics loss ...]
    spo-ray train-spm --preset spm-tiny data.train=train.parquet data.eval=eval.parquet
    spo-ray evaluate --preset eval-tiny [tuned.NAME=RUN/final ...] [section.key=value ...]
    spo-ray bench --size bench --samplers 1 2 4 --rounds 4 --out bench-out
"""

from __future__ import annotations

import argparse
import sys

from spo_ray.config import available_presets
from spo_ray.entrypoints import add_config_arguments, run_command
from spo_ray.run_log import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spo-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run SPO training")
    add_config_arguments(train, default_preset="tiny-sd15")
    train.add_argument("--engine", choices=["in-process", "ray"], default="in-process")
    sub.add_parser("presets", help="list the presets")
    compare = sub.add_parser("compare", help="compare tracked runs: a table, metric plots, a comparison run")
    compare.add_argument("--experiment", default=None, help="compare every training run of this MLflow experiment (default without --runs: spo-ray)")
    compare.add_argument("--runs", nargs="+", default=None, metavar="ID", help="MLflow run ids (added to --experiment's)")
    compare.add_argument("--tracking-uri", default=None,
                         help="default: MLFLOW_TRACKING_URI, else the store of --output-dir")
    compare.add_argument("--output-dir", default="runs", help="the runs' run.output_dir (its mlflow.db); default ./runs")
    compare.add_argument("--out", default=None, metavar="DIR", help="where the table and PNGs go (default ./compare-<time>)")
    compare.add_argument("--metrics", nargs="+", default=None, help="default: loss mean_score (eval/* always added)")
    evaluate = sub.add_parser("evaluate", help="evaluate base vs tuned models in the paper's format (on Ray)")
    add_config_arguments(evaluate, default_preset="eval-tiny", kind="eval")  # eval-* presets; tuned.NAME=RUN/final adds a model
    train_spm = sub.add_parser("train-spm", help="train a step-aware preference model (on Ray)")
    add_config_arguments(train_spm, default_preset="spm-tiny", kind="spm")  # spm-* presets
    bench = sub.add_parser("bench", help="benchmark both engines on identical work (starts a local Ray cluster)")
    bench.add_argument("--size", choices=["tiny", "bench", "sd15", "sdxl"], default="bench")
    bench.add_argument("--samplers", nargs="+", type=int, default=[1, 2, 4], help="Ray sampler actors per run")
    bench.add_argument("--engines", nargs="+", choices=["in-process", "ray"], default=["in-process", "ray"])
    bench.add_argument("--rounds", type=int, default=3, help="round 1 is start-up; rounds 2..N are measured")
    bench.add_argument("--prompts-per-round", type=int, default=4)
    bench.add_argument("--steps", type=int, default=10, help="DDIM steps")
    bench.add_argument("--out", default="bench-out", metavar="DIR", help="bench.json and bench.md go here")
    bench.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    bench.add_argument("--scale", action="store_true",
                       help="the Ray engine's per-unit costs at 1, 2, 4, 8 trainer ranks and samplers (tiny model), "
                            "extrapolated to the cluster cases (instead of the engine comparison)")
    bench.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        print("\n".join(available_presets()))
        return 0
    if args.command == "compare":
        return compare_main(args)
    if args.command == "bench" and args.scale:
        from spo_ray.bench.scale import ScaleOptions, run_scale

        print(run_scale(ScaleOptions(rounds=args.rounds, out=args.out))["markdown"], end="")
        return 0
    if args.command == "bench":
        from spo_ray.bench import BenchOptions, run_bench

        result = run_bench(BenchOptions(
            size=args.size, samplers=args.samplers, engines=args.engines, rounds=args.rounds,
            prompts_per_round=args.prompts_per_round, steps=args.steps, out=args.out, flops=not args.no_flops,
            overrides=args.overrides,
        ))
        print(result["markdown"], end="")
        return 0
    kind = {"train": "spo", "evaluate": "eval", "train-spm": "spm"}[args.command]
    return run_command(kind, args, engine=getattr(args, "engine", "ray"))


def compare_main(args: argparse.Namespace) -> int:
    from spo_ray.compare import CompareError, compare_runs
    from spo_ray.tracking import TrackingError

    try:
        result = compare_runs(
            experiment=args.experiment, run_ids=args.runs, tracking_uri=args.tracking_uri, output_dir=args.output_dir,
            out_dir=args.out, metrics=args.metrics,
        )
    except (CompareError, TrackingError) as err:
        print(f"spo-ray compare: {err}", file=sys.stderr)
        return 1
    print(result.table, end="")
    print(f"plots: {', '.join(str(p) for p in result.plots)}")
    if result.comparison_run_id:
        print(f"comparison run: {result.comparison_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
