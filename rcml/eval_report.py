"""Write an evaluation report (report.json, report.md, plots) and log it to MLflow.

report.json is strict JSON: non-finite numbers (a task with no query) become ``null``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rcml.eval_metrics import SIMILARITIES

KS = (1, 5, 10)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    r, g = report.get("retrieval", {}), report.get("gallery", {})
    lines = [f"# Evaluation ({report.get('mode', '?')} mode, seed {report.get('seed')})", ""]
    counts = report.get("counts", {})
    lines += [f"{counts.get('items', '?')} items, {counts.get('groups', '?')} relation groups "
              f"({counts.get('groups_with_2_or_more', '?')} with 2+ members), {counts.get('relation_texts', '?')} "
              f"relation texts.", ""]
    lines += [f"## Relation-guided retrieval ({r.get('queries', 0)} queries, 1 positive + "
              f"{report.get('negatives', '?')} negatives)", ""]
    lines += _table(["", *SIMILARITIES], [[f"Hit@{k}", *[r.get(f"hit@{k}", {}).get(s) for s in SIMILARITIES]]
                                          for k in KS])
    by_type = r.get("by_type", {})
    if by_type:
        lines += ["", "Hit@5 by relation type:", ""]
        lines += _table(["type", "queries", *SIMILARITIES],
                        [[t, v["queries"], *[v["hit@5"][s] for s in SIMILARITIES]] for t, v in by_type.items()])
    lines += ["", f"## Full-gallery retrieval ({g.get('queries', 0)} queries, one gallery per relation type)", ""]
    lines += _table(["direction", "R@1", "R@5", "R@10", "MRR"],
                    [[d, *[g.get(d, {}).get(m) for m in ("R@1", "R@5", "R@10", "MRR")]]
                     for d in ("image_to_text", "text_to_image")])
    t = report.get("relation_type", {})
    lines += ["", f"## Relation-type prediction ({t.get('pairs', 0)} pairs, {t.get('types', '?')} types)", ""]
    lines += _table(["", "top-1", "top-3"], [["accuracy", t.get("top1"), t.get("top3")],
                                              ["chance", t.get("chance_top1"), t.get("chance_top3")]])
    v = report.get("validity", {})
    lines += ["", f"## Relation validity (linear probe, {v.get('pairs', 0)} pairs)", ""]
    if "accuracy" in v:
        lines += _table(["accuracy", "balanced accuracy", "AUC", "train accuracy"],
                        [[v["accuracy"], v["balanced_accuracy"], v["auc"], v["train_accuracy"]]])
    else:
        lines.append(v.get("note", "not computed"))
    return "\n".join(lines) + "\n"


def plot_hits(report: dict[str, Any], path: Path) -> Path:
    """Grouped bar chart: Hit@1/5/10 for each similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report.get("retrieval", {})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(KS)
    for j, k in enumerate(KS):
        values = [r.get(f"hit@{k}", {}).get(s) for s in SIMILARITIES]
        values = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
        ax.bar([i + (j - 1) * width for i in range(len(SIMILARITIES))], values, width, label=f"Hit@{k}")
    chance = {k: min(1.0, k / max(1, r.get("candidates", 21))) for k in KS}
    ax.axhline(chance[5], color="grey", linestyle=":", linewidth=1, label="Hit@5 chance")
    ax.set_xticks(range(len(SIMILARITIES)), SIMILARITIES)
    ax.set_ylim(0, 1.2)  # head room for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("hit rate")
    ax.set_title(f"Relation-guided retrieval ({report.get('mode', '?')})")
    ax.legend(fontsize=8, ncols=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_by_type(report: dict[str, Any], path: Path) -> Path | None:
    """Hit@5 (AVG) per relation type."""
    by_type = report.get("retrieval", {}).get("by_type", {})
    if not by_type:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_type)
    values = [by_type[n]["hit@5"]["AVG"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 1.2))
    ax.barh(names, [v if math.isfinite(v) else 0.0 for v in values])
    ax.set_xlim(0, 1)
    ax.set_xlabel("Hit@5 (AVG)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json, report.md, hits.png, hits_by_type.png in ``out_dir`` (created). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_clean(report), indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_hits(report, out / "hits.png")
    plot_by_type(report, out / "hits_by_type.png")
    return out


def log_to_mlflow(report: dict[str, Any], out_dir: str | Path | None = None, step: int | None = None) -> bool:
    """Log the report's numbers as metrics (``eval/retrieval/hit_at_5/AVG``...) and ``out_dir`` as artifacts
    into the active MLflow run. Returns False (and does nothing) when no run is active."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    if mlflow.active_run() is None:
        return False
    from rcml.train.trainer import flat_numbers

    mlflow.log_metrics(flat_numbers(report, "eval/"), step=step)
    if out_dir is not None and Path(out_dir).is_dir():
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
    return True
