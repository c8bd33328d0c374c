"""Evaluate an exported RCML model with the paper's protocol on a set of shards.

    python launch/evaluate.py --checkpoint runs/demo/rcml/export --shards 'data/val/shard-{000000..000001}.tar' \
        --out runs/demo/eval [--max-items N] [--negatives 20] [--seed 0] [--device cpu] [--mlflow]

Writes report.json, report.md and plots to --out and prints the markdown report. Logs to MLflow when
MLFLOW_TRACKING_URI is set or --mlflow is given (then, without a tracking URI, into an embedded sqlite
store ``<out>/mlflow.db``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import inspect

    from rcml.eval import evaluate

    # the evaluation's defaults are written once, in rcml.eval.evaluate (which takes them from EvalConfig)
    default = {k: v.default for k, v in inspect.signature(evaluate).parameters.items()}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory (<train.out_dir>/export)")
    p.add_argument("--shards", required=True, help="shard URL pattern, brace-expanded ('a::b' joins sources)")
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--max-items", type=int, default=None, help="use the first N valid items of the shards")
    p.add_argument("--negatives", type=int, default=default["negatives"],
                   help="negatives per relation-guided query (default %(default)s)")
    p.add_argument("--seed", type=int, default=default["seed"], help="evaluation plan seed (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--batch-size", type=int, default=default["batch_size"], help="items per tower call")
    p.add_argument("--max-queries", type=int, default=default["max_queries"],
                   help="relation-guided queries (seeded subsample; default %(default)s)")
    p.add_argument("--max-pairs", type=int, default=default["max_pairs"],
                   help="pairs for relation-type and validity tasks (default %(default)s)")
    p.add_argument("--max-galleries", type=int, default=default["max_galleries"],
                   help="relation-conditioned galleries (seeded subsample; default %(default)s)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad sample instead of skipping it")
    p.add_argument("--mlflow", action="store_true", help="log to MLflow even without MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="rcml-eval", help="MLflow experiment name")
    p.add_argument("--run-name", default="", help="MLflow run name (default: the checkpoint directory)")
    return p.parse_args(argv)


def load_samples(shards: str, max_items: int | None, strict: bool) -> tuple[list[dict], dict[str, int]]:
    from rcml.data import iter_samples
    from rcml.decode import SkipCounter

    counter = SkipCounter(strict=strict)
    samples = []
    for sample in iter_samples(shards, counter=counter):
        samples.append(sample)
        if max_items is not None and len(samples) >= max_items:
            break
    return samples, dict(counter.counts)


def log_run(report: dict, out: Path, args: argparse.Namespace) -> str:
    import mlflow

    from rcml.eval import log_to_mlflow

    from rcml.train.tracking import open_store

    uri = open_store(out, args.experiment)
    with mlflow.start_run(run_name=args.run_name or Path(args.checkpoint).resolve().parent.name) as run:
        mlflow.log_params({"checkpoint": str(Path(args.checkpoint).resolve()), "shards": args.shards,
                           "max_items": args.max_items, "negatives": args.negatives, "seed": args.seed,
                           "mode": report.get("mode")})
        log_to_mlflow(report, out)
        return f"{uri} (run {run.info.run_id})"


def main(argv: list[str] | None = None) -> int:
    import torch

    # no_grad as a context, not set_grad_enabled(False): main() is also called in-process (tests, notebooks)
    with torch.no_grad():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from rcml.decode import BadSampleError
    from rcml.eval import evaluate, write_report
    from rcml.export import from_pretrained

    try:
        loaded = from_pretrained(args.checkpoint, map_location=args.device)
    except FileNotFoundError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    try:
        samples, skipped = load_samples(args.shards, args.max_items, args.strict)
    except BadSampleError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    if not samples:
        print(f"error: no valid sample in {args.shards} (skipped: {skipped or 'none'}); check the pattern",
              file=sys.stderr)
        return 1
    spec = loaded.spec
    start = time.perf_counter()
    report = evaluate(loaded.model, loaded.tokenizer, samples, mode=spec["mode"],
                      context_length=int(spec["context_length"]), image_size=int(spec["image_size"]),
                      negatives=args.negatives, seed=args.seed, batch_size=args.batch_size,
                      max_queries=args.max_queries, max_pairs=args.max_pairs, max_galleries=args.max_galleries)
    report["counts"]["skipped_samples"] = skipped
    report["checkpoint"] = str(Path(args.checkpoint).resolve())
    report["shards"] = args.shards
    report["seconds"] = round(time.perf_counter() - start, 2)
    out = Path(args.out)
    write_report(report, out)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'} ({report['seconds']} s)")
    if os.environ.get("MLFLOW_TRACKING_URI") or args.mlflow:
        print(f"MLflow: {log_run(report, out, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
