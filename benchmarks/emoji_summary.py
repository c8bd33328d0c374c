"""Collect the emoji benchmark's per-seed reports into one JSON and print the comparison tables.

    python benchmarks/emoji_summary.py --runs runs/emoji --out benchmarks/results/emoji_rcml_vs_clip.json \
        --seeds 0,1,2 rcml clip beta_1 [untrained_rcml ...] [--keep-existing]
    python benchmarks/emoji_summary.py --out benchmarks/results/emoji_rcml_vs_clip.json --print-only [names]

Reads ``<runs>/<name>/seed_<s>/eval_<split>/report.json`` (written by benchmarks/emoji_rcml_vs_clip.sh)
and writes ``{name: {split: mean report + {"std": report of sample stds, "seeds": [...]}, "train": [...]}}``.
The relation-blind baselines inside each report are computed on that report's plan; runs evaluated with
the same seed share the plan, so their baselines agree (checked here). ``--keep-existing`` adds the named
runs to the runs already in ``--out`` (a named run replaces its old entry); the plan check then covers
every run in the file, so an entry evaluated on other samples or seeds is refused, not mixed in.
``--print-only`` prints the tables of the runs already in ``--out`` (all of them unless named) and writes
nothing.

Besides the overall tables, the confusable protocol is broken down by the query's relation type (MEAN and
TT and IT Hit@5 per type): the overall MEAN averages types whose relation can be read from a caption (skin tone,
keyword) with types that no caption or image carries (release, OpenMoji artist), and conditioning can only
pay where the relation selects something the item shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcml.eval.report import strict_json, aggregate_reports  # noqa: E402

SPLITS = (("val_styles", "held-out styles (out-of-domain)"), ("val_emoji", "held-out emoji (zero-shot)"))
COLUMNS = ("MEAN", "TT", "II", "TI", "IT", "AVG")


def collect(runs: Path, names: list[str], seeds: list[int]) -> dict:
    out: dict = {}
    for name in names:
        entry: dict = {"train": []}
        for split, _ in SPLITS:
            reports = [json.loads((runs / name / f"seed_{s}" / f"eval_{split}" / "report.json").read_text())
                       for s in seeds]
            mean, std = aggregate_reports(reports)
            entry[split] = mean | {"std": std, "seeds": seeds}
        for s in seeds:
            summary = runs / name / f"seed_{s}" / "train_summary.json"
            entry["train"].append(json.loads(summary.read_text()) if summary.is_file() else {"seed": s})
        out[name] = entry
    return out


def check_shared_plans(result: dict, names: list[str]) -> None:
    """Same seed, same samples -> same plan -> identical baselines in every run (the no_descriptions
    run is evaluated on the generic splits, whose relation texts differ but whose plan is the same)."""
    for split, _ in SPLITS:
        ref = result[names[0]][split]["baselines"]
        for name in names[1:]:
            other = result[name][split]["baselines"]
            for key in ("retrieval", "retrieval_confusable"):
                if _comparable(other[key], ref[key]) != _comparable(ref[key], other[key]):
                    raise SystemExit(f"{name} {split}: the {key} baselines differ from {names[0]}'s: the runs were "
                                     "not evaluated on the same plan (different seeds or shards?)")


def _comparable(baselines: dict, other: dict) -> dict:
    """The baselines of ``baselines`` that ``other`` has too: reports written before the per-type baselines
    existed lack ``by_type``; where both have it, it is compared as well."""
    return {name: {k: v for k, v in values.items() if k != "by_type" or "by_type" in other.get(name, {})}
            for name, values in baselines.items()}


def _blind_by_type(result: dict, names: list[str], split: str) -> tuple[dict, list[str]]:
    """(a report whose confusable baselines carry by_type, their names), or ({}, []) when none does."""
    for name in names:
        report = result[name][split]
        blind = report["baselines"]["retrieval_confusable"]
        if all("by_type" in v for v in blind.values()):
            return report, list(blind)
    return {}, []


def pm(report: dict, path: tuple[str, ...]) -> str:
    mean, std = report, report["std"]
    for key in path:
        mean, std = (mean or {}).get(key), (std or {}).get(key)
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if isinstance(std, float) else f"{mean:.3f}"


def print_tables(result: dict, names: list[str]) -> None:
    n_seeds = len(result[names[0]][SPLITS[0][0]]["seeds"])
    for split, title in SPLITS:
        for key, protocol in (("retrieval_confusable", "confusable negatives"), ("retrieval", "random negatives")):
            print(f"\n### {title}, {protocol}: Hit@5 (1 positive + 20 negatives), mean ± std over {n_seeds} seeds\n")
            print("| run | " + " | ".join(COLUMNS) + " |")
            print("|---" * (len(COLUMNS) + 1) + "|")
            for name in names:
                r = result[name][split]
                print(f"| {name} | " + " | ".join(pm(r, (key, "hit@5", c)) for c in COLUMNS) + " |")
            base = result[names[0]][split]
            for blind in base["baselines"][key]:
                value = pm(base, ("baselines", key, blind, "hit@5"))
                print(f"| {blind} (blind, no model) | " + " | ".join([value] * len(COLUMNS)) + " |")
            chance = f"{5 / base[key]['candidates']:.3f}"
            print("| chance | " + " | ".join([chance] * len(COLUMNS)) + " |")
            print(f"\nconfusable negatives: {pm(base, (key, 'confusable_fraction'))} of all negatives")
        print(f"\n### {title}: gallery, relation type, validity\n")
        print("| run | gallery MRR i->t | gallery MRR t->i | type top-3 | validity AUC |")
        print("|---|---|---|---|---|")
        for name in names:
            r = result[name][split]
            print(f"| {name} | {pm(r, ('gallery', 'image_to_text', 'MRR'))} | {pm(r, ('gallery', 'text_to_image', 'MRR'))}"
                  f" | {pm(r, ('relation_type', 'top3'))} | {pm(r, ('validity', 'auc'))} |")
        base = result[names[0]][split]
        b = ("baselines",)
        print(f"| shared_groups (blind) | {pm(base, b + ('gallery', 'shared_groups', 'MRR'))} | same | - | - |")
        print(f"| caption_overlap (blind) | {pm(base, b + ('gallery', 'caption_overlap', 'MRR'))} | same | - | - |")
        print(f"| type prior / type only (blind) | - | - | {pm(base, b + ('relation_type', 'type_prior', 'top3'))} | "
              f"{pm(base, b + ('validity', 'type_only', 'auc'))} |")
        print(f"| chance | - | - | {pm(base, ('relation_type', 'chance_top3'))} | 0.500 |")


def print_type_tables(result: dict, names: list[str]) -> None:
    """Confusable protocol by the query's relation type: one column per run, MEAN, TT and IT Hit@5."""
    n_seeds = len(result[names[0]][SPLITS[0][0]]["seeds"])
    for split, title in SPLITS:
        types = result[names[0]][split]["retrieval_confusable"]["by_type"]
        blind_report, blind = _blind_by_type(result, names, split)
        for column in ("MEAN", "TT", "IT"):
            print(f"\n### {title}, confusable negatives, by relation type: {column} Hit@5, mean ± std over "
                  f"{n_seeds} seeds\n")
            print("| relation type | queries | " + " | ".join(names + [f"{b} (blind)" for b in blind]) + " |")
            print("|---" * (len(names) + len(blind) + 2) + "|")
            for rtype in sorted(types):
                queries = types[rtype]["queries"]
                cells = [pm(result[name][split], ("retrieval_confusable", "by_type", rtype, "hit@5", column))
                         for name in names]
                cells += [pm(blind_report, ("baselines", "retrieval_confusable", b, "by_type", rtype, "hit@5"))
                          for b in blind]
                print(f"| {rtype} | {queries:.0f} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, help="the runs' directory (required unless --print-only)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2 (required unless --print-only)")
    p.add_argument("--keep-existing", action="store_true",
                   help="keep the runs already in --out that are not named here (same plans required)")
    p.add_argument("--print-only", action="store_true", help="print the tables of --out; read and write nothing else")
    p.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    if args.print_only:
        result = json.loads(args.out.read_text())
        names = args.names or list(result)
        missing = [n for n in names if n not in result]
        if missing:
            raise SystemExit(f"{args.out} has no run(s) {missing}; it has {sorted(result)}")
        print_tables(result, names)
        print_type_tables(result, names)
        return 0
    if args.runs is None or args.seeds is None or not args.names:
        p.error("--runs, --seeds and at least one run name are required (or pass --print-only)")
    seeds = [int(s) for s in args.seeds.split(",")]
    result = collect(args.runs, args.names, seeds)
    if args.keep_existing and args.out.is_file():
        old = json.loads(args.out.read_text())
        for name, entry in old.items():
            if name not in result:
                if entry[SPLITS[0][0]]["seeds"] != seeds:
                    raise SystemExit(f"{args.out}: {name} was evaluated with seeds {entry[SPLITS[0][0]]['seeds']}, "
                                     f"not {seeds}: it cannot stand beside these runs")
                result[name] = entry
        args.names = list(old) + [n for n in args.names if n not in old]
    check_shared_plans(result, [n for n in args.names if n != "no_descriptions"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(strict_json(result), indent=2, sort_keys=True) + "\n")
    print_tables(result, args.names)
    print_type_tables(result, args.names)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
