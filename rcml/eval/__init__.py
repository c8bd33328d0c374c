"""Evaluation that needs the relation: retrieval under two protocols, a relation-conditioned gallery,
relation-type prediction and relation validity, each next to relation-blind baselines on the same plan.

``evaluate(model, tokenizer, samples, ...)`` (``rcml.eval.tasks``) plans every task from the samples'
metadata (``rcml.eval.plan``), embeds the distinct (item, relation) rows once through the public
embedding API (``rcml.embedding``), scores them with the pure functions of ``rcml.eval.metrics`` and the
zero-parameter scorers of ``rcml.eval.baselines``; ``rcml.eval.report`` writes, aggregates and logs.

The tasks, as implemented:

- **Relation-guided retrieval, two protocols** (``retrieval``, ``retrieval_confusable``). Query = (item
  q, one of its relations r of group g); 1 positive (a member of g) + ``negatives`` items, all embedded
  under r. ``retrieval`` is the paper's: random non-members as negatives. ``retrieval_confusable`` draws
  the negatives first from items that share *another* group with q (a relation-blind model cannot tell
  them from the positive) and prefers a positive that shares few other groups with q. Hit@1/5/10 under
  TT, II, TI, IT, AVG (the per-candidate mean of the four scores) and MEAN (the mean of the four hit
  rates); per relation type; the fraction of negatives that were confusable.
- **Relation-conditioned gallery** (``gallery``). One gallery per sampled relation group g: its members
  and other items of g's type, every one embedded under g's text; each member queries the gallery
  (image->text and text->image), positives are the other members. R@1/5/10 and MRR.
- **Relation-type prediction (top-3).** For a related pair (a, b), every relation of a or b is a
  candidate explanation, scored by how close it brings the pair (AVG similarity of a and b, both
  embedded under it). A type scores its best candidate; the top-k types are compared with the types of
  the groups a and b really share. The chance level of a random ranking is reported beside it.
- **Relation validity.** A logistic-regression probe on pair features ``[u_a*u_b, t_a*t_b, u_a*t_b,
  t_a*u_b]`` (both items embedded under the relation) predicts whether the pair is valid under that
  relation: one valid relation (shared) and one invalid one (a relation of a or b that they do not
  share) per pair. 70/30 split by pair, fixed seed.
- **Baselines** (``baselines``): shared-group count and caption word overlap on both retrieval
  protocols and the gallery, the best fixed relation-type order, and a type-only validity probe.

In ``clip`` mode the image embedding does not depend on the relation and the text is
``clip_mode_text(caption, relation text)``, exactly as the CLIP baseline was trained.
"""

from rcml.eval.report import aggregate_reports, flat_numbers, log_to_mlflow, render_markdown, write_report
from rcml.eval.tasks import embed_rows, evaluate, zero3_parameter_discovery

__all__ = ["evaluate", "embed_rows", "zero3_parameter_discovery", "write_report", "render_markdown",
           "log_to_mlflow", "flat_numbers", "aggregate_reports"]
