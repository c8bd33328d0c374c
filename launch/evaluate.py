"""Evaluate an exported RCML model with the paper's protocol on a set of shards.

    python launch/evaluate.py --checkpoint runs/demo/rcml/export --shards 'data/val/shard-{000000..000001}.tar' \
        --out runs/demo/eval [--max-items N] [--negatives 20] [--seed 0] [--device cpu] [--mlflow]

--checkpoint is an export folder, a training run directory (``train.out_dir``: its ``export/``, or its
latest checkpoint while it has none), or a training checkpoint (``<out_dir>/checkpoints/step_<n>``, or
``checkpoints/`` for its latest), which is converted to an export in a temporary folder first
(``python -m rcml.train.checkpoint export`` keeps one). --shards is a brace pattern, a shard directory or
its manifest.json. Writes report.json, report.md
and plots to --out and prints the markdown report (progress bars go to stderr). Logs to MLflow when
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
    p.add_argument("--checkpoint", required=True,
                   help="export directory (<train.out_dir>/export), the run directory <train.out_dir>, or a "
                   "training checkpoint <train.out_dir>/checkpoints/step_<n>")
    p.add_argument("--shards", required=True, help="shard URL pattern, brace-expanded ('a::b' joins sources), "
                   "or a shard directory / its manifest.json")
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


EXPORT_MARKER = "spec.json"  # what makes a directory an RCML export (rcml.export.write_export)


def resolve_checkpoint(path: Path) -> tuple[Path, bool]:
    """What ``--checkpoint path`` names -> (directory, is_training_checkpoint): an export folder (``path``
    itself, or ``path/export`` for a run directory), else a training checkpoint (``path`` a ``step_<n>``
    directory; the latest of ``path`` when it is a ``checkpoints/`` directory, or of ``path/checkpoints``
    for a run directory that has not exported yet). Raises FileNotFoundError saying what is expected."""
    from rcml.train import checkpoint

    expected = ("pass an export folder (<train.out_dir>/export), the run directory <train.out_dir>, or a "
                "training checkpoint <train.out_dir>/checkpoints/step_<n>")
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; {expected}")
    if not path.is_dir():
        return path, False  # rcml.from_pretrained says what an export holds
    if not (path / checkpoint.COMPLETE).exists():  # a checkpoint carries a spec.json too
        if (path / EXPORT_MARKER).exists():
            return path, False  # rcml.from_pretrained checks the files of the export
        if (path / "export").is_dir():
            return path / "export", False
    try:
        found = checkpoint.locate(path)
    except RuntimeError as exn:
        raise FileNotFoundError(f"--checkpoint {path}: {exn}") from None
    if found is not None:
        return found, True
    if path.name.startswith(checkpoint.TMP_PREFIX):
        raise FileNotFoundError(f"--checkpoint {path} is a checkpoint whose save did not finish; {expected}")
    raise FileNotFoundError(f"--checkpoint {path} is not an RCML export (no {EXPORT_MARKER}), holds no export/ and "
                            f"no published checkpoint; {expected}")


def load_model(path: Path, device: str):
    """``resolve_checkpoint``'s answer -> the loaded ``RCMLEmbedder``; a training checkpoint is converted to an
    export in a temporary folder first (deleted once the model is in memory)."""
    import tempfile

    from rcml.export import from_pretrained
    from rcml.train.checkpoint_export import export_checkpoint

    directory, is_training = resolve_checkpoint(path)
    if not is_training:
        if directory != path:
            print(f"evaluating the export {directory}", file=sys.stderr)
        return directory, from_pretrained(directory, map_location=device)
    print(f"evaluating the training checkpoint {directory}, converted to an export first "
          f"(`python -m rcml.train.checkpoint export {directory} --out DIR` keeps one)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rcml-eval-") as tmp:
        return directory, from_pretrained(export_checkpoint(directory, Path(tmp) / "export"), map_location=device)


def load_samples(shards: str, max_items: int | None, strict: bool) -> tuple[list[dict], dict[str, int],
                                                                            dict[str, int]]:
    """-> (the first ``max_items`` valid samples, skipped samples by reason, ignored members by extension)."""
    from tqdm import tqdm

    from rcml.data import iter_samples
    from rcml.decode import SkipCounter

    counter = SkipCounter(strict=strict)
    samples = []
    with tqdm(total=max_items, desc="reading samples", unit="sample", file=sys.stderr, disable=None) as bar:
        for sample in iter_samples(shards, counter=counter):
            samples.append(sample)
            bar.update(1)
            if max_items is not None and len(samples) >= max_items:
                break
    return samples, dict(counter.counts), dict(counter.ignored)


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
    from rcml.shard_manifest import resolve_pattern

    try:  # before the model is loaded: a wrong path is found at once
        args.shards = resolve_pattern(args.shards)
    except ValueError as exn:
        print(f"error: --shards: {exn}", file=sys.stderr)
        return 2
    try:
        checkpoint, loaded = load_model(Path(args.checkpoint), args.device)
        args.checkpoint = str(checkpoint)
    except (FileNotFoundError, RuntimeError) as exn:  # RuntimeError: a checkpoint that fails its checks
        print(f"error: {exn}", file=sys.stderr)
        return 2
    try:
        samples, skipped, ignored = load_samples(args.shards, args.max_items, args.strict)
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
    report["counts"]["ignored_members"] = ignored
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
