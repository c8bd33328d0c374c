"""Write an evaluation report (report.json, report.md, plots), aggregate reports over seeds, log to MLflow.

report.json is strict JSON: non-finite numbers (a task with no query) become ``null``. report.md prints
every model number next to the relation-blind baselines computed on the same plan, and the chance level.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from rcml.eval.metrics import HIT_COLUMNS, KS

PROTOCOLS = (("retrieval", "paper's protocol: random negatives"),
             ("retrieval_confusable", "confusable protocol: negatives related to the query item under another "
                                      "relation"))


def strict_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    # a cell is data, never markup: no column breaks, no line breaks, no HTML
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _retrieval_section(report: dict[str, Any], key: str, title: str) -> list[str]:
    r = report.get(key, {})
    base = report.get("baselines", {}).get(key, {})
    if not r.get("queries"):
        return [f"## Relation-guided retrieval, {title}", "", "no query", ""]
    candidates = r.get("candidates", 21)
    lines = [f"## Relation-guided retrieval, {title}", "",
             f"{r['queries']} queries, 1 positive + {candidates - 1} negatives; "
             f"{r.get('confusable_fraction', 0.0):.1%} of the negatives share another group with the query item.", ""]
    rows = [[f"model Hit@{k}", *[r.get(f"hit@{k}", {}).get(s) for s in HIT_COLUMNS]] for k in KS]
    for name, values in base.items():
        rows.append([f"{name} (blind) Hit@5", *[values.get("hit@5")] * len(HIT_COLUMNS)])
    rows.append(["chance Hit@5", *[min(1.0, 5 / candidates)] * len(HIT_COLUMNS)])
    lines += _table(["", *HIT_COLUMNS], rows)
    by_type = r.get("by_type", {})
    if by_type:
        lines += ["", "Hit@5 by relation type:", ""]
        lines += _table(["type", "queries", *HIT_COLUMNS],
                        [[t, v["queries"], *[v["hit@5"][s] for s in HIT_COLUMNS]] for t, v in by_type.items()])
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    g, base = report.get("gallery", {}), report.get("baselines", {})
    lines = [f"# Evaluation ({_fmt(report.get('mode', '?'))} mode, seed {report.get('seed')})", ""]
    counts = report.get("counts", {})
    lines += [f"{counts.get('items', '?')} items, {counts.get('groups', '?')} relation groups "
              f"({counts.get('groups_with_2_or_more', '?')} with 2+ members), {counts.get('relation_texts', '?')} "
              f"relation texts. Rows marked (blind) are zero-parameter scorers that never read the relation.", ""]
    for key, title in PROTOCOLS:
        lines += _retrieval_section(report, key, title)
    lines += [f"## Relation-conditioned gallery ({g.get('galleries', 0)} galleries of "
              f"{_fmt(g.get('mean_candidates'))} items on average, {g.get('queries', 0)} queries)", ""]
    rows = [[f"model {d}", *[g.get(d, {}).get(m) for m in ("R@1", "R@5", "R@10", "MRR")]]
            for d in ("image_to_text", "text_to_image")]
    rows += [[f"{name} (blind)", *[v.get(m) for m in ("R@1", "R@5", "R@10", "MRR")]]
             for name, v in base.get("gallery", {}).items()]
    lines += _table(["", "R@1", "R@5", "R@10", "MRR"], rows)
    t = report.get("relation_type", {})
    prior = base.get("relation_type", {}).get("type_prior", {})
    lines += ["", f"## Relation-type prediction ({t.get('pairs', 0)} pairs, {t.get('types', '?')} types)", ""]
    lines += _table(["", "top-1", "top-3"], [["model", t.get("top1"), t.get("top3")],
                                              ["type prior (blind, fixed order)", prior.get("top1"), prior.get("top3")],
                                              ["chance", t.get("chance_top1"), t.get("chance_top3")]])
    v = report.get("validity", {})
    type_only = base.get("validity", {}).get("type_only", {})
    lines += ["", f"## Relation validity (linear probe, {v.get('pairs', 0)} pairs)", ""]
    if "accuracy" in v:
        lines += _table(["", "accuracy", "balanced accuracy", "AUC"],
                        [["model", v["accuracy"], v["balanced_accuracy"], v["auc"]],
                         ["type only (blind)", type_only.get("accuracy"), type_only.get("balanced_accuracy"),
                          type_only.get("auc")]])
    else:
        lines.append(_fmt(v.get("note", "not computed")))
    return "\n".join(lines) + "\n"


def plot_hits(report: dict[str, Any], path: Path) -> Path:
    """Hit@5 per similarity under both protocols, with the best blind baseline of each as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, PROTOCOLS):
        r = report.get(key, {})
        values = [r.get("hit@5", {}).get(s) for s in HIT_COLUMNS]
        values = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
        ax.bar(range(len(HIT_COLUMNS)), values, 0.6, label="model")
        blind = report.get("baselines", {}).get(key, {})
        for (name, v), style in zip(blind.items(), ("--", "-.")):
            ax.axhline(v.get("hit@5", 0.0), color="black", linestyle=style, linewidth=1, label=f"{name} (blind)")
        ax.axhline(min(1.0, 5 / max(1, r.get("candidates", 21))), color="grey", linestyle=":", linewidth=1,
                   label="chance")
        ax.set_xticks(range(len(HIT_COLUMNS)), HIT_COLUMNS)
        ax.set_ylim(0, 1.2)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(title.split(":")[0], fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncols=2)
    axes[0].set_ylabel("Hit@5")
    fig.suptitle(f"Relation-guided retrieval ({report.get('mode', '?')} mode)".replace("$", r"\$"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


REPORT_FILES = ("report.json", "report.md", "hits.png")  # what write_report writes


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json, report.md, hits.png in ``out_dir`` (created). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(strict_json(report), indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_hits(report, out / "hits.png")
    return out


# ------------------------------------------------------------------------------------------ numbers
def flat_numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"retrieval": {"hit@5": {"AVG": 0.4}}}`` -> ``{"retrieval/hit_at_5/AVG": 0.4}`` (finite numbers only)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}".replace("@", "_at_")
        if isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def aggregate_reports(reports: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reports of the same evaluation under several seeds -> (mean report, std report), same shape.

    Every number present in all reports is averaged; ``std`` holds its sample standard deviation (0 for
    one report). A number missing or non-finite in some report becomes None in both. Non-numbers (names,
    orders) are taken from the first report and left out of ``std``.
    """
    if not reports:
        raise ValueError("aggregate_reports needs at least one report")

    def walk(values: list[Any]) -> tuple[Any, Any]:
        first = values[0]
        if isinstance(first, dict):
            mean, std = {}, {}
            for key in first:
                m, s = walk([v.get(key) if isinstance(v, dict) else None for v in values])
                mean[key] = m
                if s is not _SKIP:
                    std[key] = s
            return mean, std
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v)]
            if len(numbers) != len(values):
                return None, None
            return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0)
        return first, _SKIP

    return walk(list(reports))


_SKIP = object()


def log_to_mlflow(report: dict[str, Any], out_dir: str | Path | None = None, step: int | None = None) -> bool:
    """Log the report's numbers as metrics (``eval/retrieval/hit_at_5/AVG``...) and ``out_dir`` as artifacts
    into the active MLflow run. Returns False (and does nothing) when no run is active."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    if mlflow.active_run() is None:
        return False
    mlflow.log_metrics(flat_numbers(report, "eval/"), step=step)
    if out_dir is not None:
        # the files write_report wrote, not the whole directory: launch/evaluate.py keeps its embedded MLflow
        # store (mlflow.db, mlartifacts/) in the same directory, which would otherwise be copied into itself
        for name in REPORT_FILES:
            if (Path(out_dir) / name).is_file():
                mlflow.log_artifact(str(Path(out_dir) / name), artifact_path="eval")
    return True
