"""Evaluation plots as PNG files: rank histogram, recall@K curve, zero-shot ROC curves and the
training curves (matplotlib, Agg, no display).

Inputs are the ranks per direction, {"t2i": ..., "i2t": ...}, as metrics.paired_ranks returns
them (metrics.DirectionRanks: `.ranks` 1-based under the tie rule, `.hits(k)` per query).
"""

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LABELS = {"t2i": "text → image", "i2t": "image → text"}


def _save(figure, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=120, bbox_inches="tight")
  return path


def recall_curve(ranks, max_k):
  """(ks, recall in percent) for K = 1..max_k, as metrics reports R@K (its tie rule)."""
  ks = np.arange(1, max_k + 1)
  return ks, np.array([100.0 * np.mean(ranks.hits(k)) for k in ks])


def plot_rank_histogram(ranks_by_direction, path, bins=50):
  """Histogram of the paired item's rank per direction (log-spaced bins when N is large)."""
  n = max(int(np.ceil(np.max(r.ranks))) for r in ranks_by_direction.values())
  figure = Figure(figsize=(6, 4))
  axes = figure.add_subplot()
  edges = (np.unique(np.geomspace(1, n + 1, bins).round()) if n > bins
           else np.arange(1, n + 2)) - 0.5
  for direction, ranks in ranks_by_direction.items():
    axes.hist(ranks.ranks, bins=edges, histtype="step", linewidth=1.5,
              label=LABELS.get(direction, direction))
  if n > bins:
    axes.set_xscale("log")
  axes.set_xlabel("rank of the paired item (1 = best)")
  axes.set_ylabel("queries")
  axes.set_title(f"Rank histogram (N = {len(next(iter(ranks_by_direction.values())).ranks)})")
  axes.legend()
  return _save(figure, path)


def plot_recall_curve(ranks_by_direction, path, max_k=None):
  """Recall@K (percent) against K for each direction, with the chance line 100·K/N."""
  n = len(next(iter(ranks_by_direction.values())).ranks)
  max_k = min(n, max_k or max(10, min(n, 100)))
  figure = Figure(figsize=(6, 4))
  axes = figure.add_subplot()
  for direction, ranks in ranks_by_direction.items():
    ks, recall = recall_curve(ranks, max_k)
    axes.plot(ks, recall, label=LABELS.get(direction, direction))
  ks = np.arange(1, max_k + 1)
  axes.plot(ks, 100.0 * ks / n, linestyle="--", color="gray", label="chance")
  axes.set_xlabel("K")
  axes.set_ylabel("recall@K (%)")
  axes.set_ylim(0, 100)
  axes.set_title(f"Recall@K (N = {n})")
  axes.legend()
  return _save(figure, path)


def save_retrieval_plots(ranks_by_direction, directory):
  """Writes rank_histogram.png and recall_at_k.png into `directory`; returns their paths."""
  return [plot_rank_histogram(ranks_by_direction, os.path.join(directory, "rank_histogram.png")),
          plot_recall_curve(ranks_by_direction, os.path.join(directory, "recall_at_k.png"))]


def roc_curve(scores, labels):
  """(false positive rates, true positive rates) at every distinct threshold, from (0, 0)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  ordered, positive = np.asarray(scores)[order], np.asarray(labels)[order] > 0
  last = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]
  tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
  return (np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)])


def plot_roc(scores, labels, name, entry, path):
  """One label's zero-shot ROC curve with its AUROC (and CI) and Youden operating point."""
  figure = Figure(figsize=(4.5, 4.5))
  axes = figure.add_subplot()
  fpr, tpr = roc_curve(scores, labels)
  ci = (entry.get("ci") or {}).get("AUROC")
  text = f"AUROC {entry['AUROC']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
  axes.plot(fpr, tpr, label=text)
  if entry.get("sensitivity") is not None and entry.get("specificity") is not None:
    axes.plot([1 - entry["specificity"]], [entry["sensitivity"]], "o", color="black",
              label="operating point (Youden's J)")
  axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="chance")
  axes.set_xlabel("false positive rate")
  axes.set_ylabel("true positive rate")
  axes.set_title(f"{name} (n+ = {entry['n_positive']} of {len(labels)})")
  axes.legend(loc="lower right", fontsize=8)
  return _save(figure, path)


def save_roc_plots(scores, labels, section, directory):
  """roc_<label>.png per defined label of a zero-shot section into `directory`; their paths."""
  written = []
  for j, name in enumerate(section["labels"]):
    if section[name]["AUROC"] is None:
      continue
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or f"label{j}"
    written.append(plot_roc(scores[:, j], labels[:, j], name, section[name],
                            os.path.join(directory, f"roc_{slug}.png")))
  return written


def plot_training_curves(records, path):
  """Training loss and validation R@10 (both directions) against the step.

  records: the dicts of a run's metrics.jsonl (training lines carry "loss", validation lines
  "val_t2i_R@10" / "val_i2t_R@10").
  """
  figure = Figure(figsize=(10, 4))
  loss_axes, recall_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  steps = [r["step"] for r in records if "loss" in r]
  loss_axes.plot(steps, [r["loss"] for r in records if "loss" in r])
  loss_axes.set_xlabel("step")
  loss_axes.set_ylabel("training loss")
  loss_axes.set_title("Loss")
  for direction, label in LABELS.items():
    key = f"val_{direction}_R@10"
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      recall_axes.plot(*zip(*points), marker="o", markersize=3, label=label)
  recall_axes.set_xlabel("step")
  recall_axes.set_ylabel("validation R@10 (%)")
  recall_axes.set_ylim(0, 100)
  recall_axes.set_title("Validation recall")
  recall_axes.legend()
  return _save(figure, path)
