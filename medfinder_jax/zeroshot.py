"""Zero-shot abnormality classification: prompts, P(present), AUROC, AUPRC and operating points.

The field's protocol (CT-CLIP, and the systems compared with it): for each label, a positive and a
negative prompt ("{label}." / "No {label}." by default; CT-CLIP's are "{label} is present." /
"{label} is not present."). A volume's P(present) is the softmax over its two cosine similarities
scaled by the model's temperature, i.e. sigmoid(scale · (cos(v, positive) − cos(v, negative))).
With several phrasings (an ensemble), each prompt embedding is L2-normalized, the phrasings of a
side are averaged and the mean normalized again.

Per label, from the (N, L) probabilities and the (N, L) 0/1 labels:
- AUROC: exact, ties counted one half (the Mann-Whitney statistic; scikit-learn's
  roc_auc_score). AUPRC: average precision over distinct thresholds (average_precision_score).
- An operating point chosen by Youden's J (max sensitivity + specificity − 1, ties to the
  highest threshold) on a validation split and applied to the evaluated split (predicted
  present when P ≥ threshold): F1, accuracy, sensitivity, specificity.
- Prevalence and the number of positives. A label with no positives or no negatives in the split
  has no AUROC or AUPRC: it is reported as undefined (None), never as 0.5.
- Macro (mean over defined labels) and weighted (by positives) averages; percentile-bootstrap
  CIs of AUROC and F1 resampling studies (one resample shared by every label), seeded.

One sort per label (SortedScores, shared by Youden's J); point estimates are numpy sums over its
tie groups, and bootstrap replicates walk each label's sorted studies once per batch of replicates
with their draw counts as weights (bootstrap.py, bootstrap_kernels.label_totals).
"""

import dataclasses
import math
import warnings

import numpy as np

from medfinder_jax import bootstrap
from medfinder_jax import errors

DEFAULT_TEMPLATES = (("{label}.", "No {label}."),)
THRESHOLD_METRICS = ("F1", "accuracy", "sensitivity", "specificity")
BOOTSTRAP_METRICS = ("AUROC", "F1")   # with CIs (AUPRC: the point estimate)


class ZeroShotError(errors.UserError):
  """Zero-shot settings or inputs that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ZeroShotSettings:
  """How zero-shot classification is run (config `eval.zeroshot`).

  enabled: compute it when labels are available; templates: (positive, negative) pairs, each with
  "{label}", averaged when several; findings: the labels read from the reports (negation-aware,
  findings.py) for a corpus whose records carry no label vector; threshold_split: the split whose
  Youden's J picks each label's operating point ("" = the evaluated split itself).
  """
  enabled: bool = True
  templates: tuple = DEFAULT_TEMPLATES
  findings: tuple = ()
  threshold_split: str = "val"

  def __post_init__(self):
    templates = tuple(tuple(pair) for pair in self.templates)
    if not templates or any(len(pair) != 2 or not all(
        isinstance(t, str) and "{label}" in t for t in pair) for pair in templates):
      raise ZeroShotError(f"config eval.zeroshot.templates={self.templates!r}: expected "
                          f"(positive, negative) pairs of strings containing '{{label}}', e.g. "
                          f"{DEFAULT_TEMPLATES!r}")
    object.__setattr__(self, "templates", templates)
    if any(not isinstance(f, str) or not f.strip() for f in self.findings):
      raise ZeroShotError(f"config eval.zeroshot.findings={self.findings!r}: expected finding "
                          f"names, e.g. ('pleural effusion', 'emphysema')")
    object.__setattr__(self, "findings", tuple(self.findings))

  @classmethod
  def from_config(cls, zeroshot_config):
    if zeroshot_config is None:
      return cls(enabled=False)
    return cls(enabled=bool(zeroshot_config.enabled), templates=tuple(zeroshot_config.templates),
               findings=tuple(zeroshot_config.findings),
               threshold_split=str(zeroshot_config.threshold_split or ""))


# --- Prompts and probabilities --------------------------------------------------------------------

def prompts(label_names, templates=DEFAULT_TEMPLATES):
  """The prompt texts, flat, in (label, template, positive/negative) order: L·T·2 strings."""
  return [template.format(label=name) for name in label_names for pair in templates
          for template in pair]


def _normalize(x, dtype=np.float64):
  x = np.asarray(x, dtype)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), dtype(1e-12))


def ensemble(prompt_embeddings, num_labels, num_templates):
  """(L·T·2, D) embeddings of `prompts` -> (L, 2, D) float32: each normalized, the T phrasings
  of a side averaged, the mean normalized again."""
  embeddings = _normalize(prompt_embeddings).reshape(num_labels, num_templates, 2, -1)
  return _normalize(embeddings.mean(axis=1)).astype(np.float32)


def probabilities(image_embeddings, prompt_embeddings, scale):
  """(N, L) float32 P(present): softmax over (positive, negative) of scale · cosine.

  image_embeddings (N, D); prompt_embeddings (L, 2, D) (positive, negative); scale: the model's
  inverse temperature (losses.similarity_scale)."""
  image = _normalize(image_embeddings, np.float32)
  prompt = _normalize(prompt_embeddings, np.float32)
  labels, sides, dim = prompt.shape
  cosines = (image @ prompt.reshape(labels * sides, dim).T).reshape(-1, labels, sides)
  logits = float(scale) * cosines.astype(np.float64)
  # The softmax over (positive, negative) at the positive is a logistic of the difference
  # (clipped where exp would overflow float64; the probability is 0 or 1 there anyway).
  difference = np.clip(logits[..., 1] - logits[..., 0], -700.0, 700.0)
  return (1.0 / (1.0 + np.exp(difference))).astype(np.float32)


# --- Sorted scores ---------------------------------------------------------------------------------

@dataclasses.dataclass
class SortedScores:
  """Each label's scores sorted ascending, (L, N), and its runs of equal scores (tie groups)."""
  order: np.ndarray        # (L, N) int32 study indices, ascending score
  scores: np.ndarray       # (L, N) float32 sorted scores
  positive: np.ndarray     # (L, N) bool, in sorted order
  group_end: np.ndarray    # (L, N) int64: for each position, the end (exclusive) of its group

  @classmethod
  def of(cls, scores, labels):
    """scores, labels: (N, L) (studies x labels)."""
    scores = np.asarray(scores, np.float32).T
    order = np.argsort(scores, axis=1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=1)
    positive = np.take_along_axis(np.asarray(labels).T > 0, order, axis=1)
    return cls(order=order.astype(np.int32), scores=ordered, positive=positive,
               group_end=np.stack([_group_ends(row) for row in ordered]))

  def group_starts(self, label):
    """(G,) the first position of each of a label's tie groups."""
    return _group_starts(self.scores[label])

  def cut(self, thresholds):
    """(L,) int32: per label, the first sorted position with score >= its threshold."""
    return np.array([np.searchsorted(row, t, side="left") for row, t in
                     zip(self.scores, np.asarray(thresholds, np.float32))], np.int32)


def _group_starts(row):
  return np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))


def _group_ends(row):
  """(N,) for each position of a sorted row, the end (exclusive) of its run of equal values."""
  starts = _group_starts(row)
  bounds = np.append(starts[1:], len(row))
  return np.repeat(bounds, bounds - starts)


def _point_stats(sorted_scores, cut):
  """{"AUROC", "AUPRC", "tp", "fp", "fn", "tn"}, each (L,) float64, over tie groups.

  AUROC: each positive beats the negatives of lower groups and half of its own group's.
  AUPRC: each positive takes the precision of everything from its group up (scikit-learn's
  average precision over distinct thresholds). Called present: positions from `cut` up. AUROC
  and AUPRC are NaN for a label without positives or negatives."""
  num_labels, n = sorted_scores.positive.shape
  stats = {name: np.full(num_labels, np.nan) for name in ("AUROC", "AUPRC", "tp", "fp", "fn",
                                                          "tn")}
  for label in range(num_labels):
    positive = sorted_scores.positive[label].astype(np.float64)
    starts = sorted_scores.group_starts(label)
    group_p = np.add.reduceat(positive, starts)
    group_n = np.diff(np.append(starts, n)) - group_p
    below_p, below_n = np.cumsum(group_p) - group_p, np.cumsum(group_n) - group_n
    total_p, total_n = group_p.sum(), group_n.sum()
    if total_p > 0 and total_n > 0:
      stats["AUROC"][label] = np.sum(group_p * (below_n + 0.5 * group_n)) / (total_p * total_n)
      stats["AUPRC"][label] = np.sum(group_p * (total_p - below_p) / (n - starts)) / total_p
    fn = positive[:cut[label]].sum()
    stats["fn"][label], stats["tn"][label] = fn, cut[label] - fn
    stats["tp"][label], stats["fp"][label] = total_p - fn, total_n - (cut[label] - fn)
  return stats


def _replicate_stats(counts, sorted_scores, cut):
  """{"AUROC", "F1"}, each (R, L), of the bootstrap replicates whose draw counts are `counts`
  (N studies x R replicates; one resample shared by every label): the weighted _point_stats,
  one compiled pass per label (bootstrap_kernels.label_totals). cut: (L,)."""
  totals = np.zeros((len(cut), 5, counts.shape[1]))
  for label, out in enumerate(totals):
    bootstrap.kernels().label_totals(counts, sorted_scores.order[label],
                                     sorted_scores.positive[label],
                                     sorted_scores.group_end[label], int(cut[label]), out)
  twice_u, total_p, total_n, fn, tn = np.moveaxis(totals, 1, 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    auroc = np.where((total_p > 0) & (total_n > 0), 0.5 * twice_u / (total_p * total_n), np.nan)
    f1 = _threshold_metrics({"tp": total_p - fn, "fp": total_n - tn, "fn": fn, "tn": tn})["F1"]
  return {"AUROC": auroc.T, "F1": f1.T}


# --- Operating points ------------------------------------------------------------------------------

def youden_thresholds(scores, labels):
  """(L,) float32: per label, the score that maximizes sensitivity + specificity − 1 when P ≥
  threshold is called present (ties to the highest threshold); NaN for a label without
  positives or negatives."""
  return _youden_thresholds(SortedScores.of(scores, labels))


def _youden_thresholds(sorted_scores):
  positive = sorted_scores.positive.astype(np.float64)
  total_p = positive.sum(axis=1, keepdims=True)
  total_n = positive.shape[1] - total_p
  below_p = np.cumsum(positive, axis=1) - positive
  below_n = np.cumsum(1.0 - positive, axis=1) - (1.0 - positive)
  with np.errstate(invalid="ignore", divide="ignore"):
    j = (total_p - below_p) / total_p - (total_n - below_n) / total_n
  thresholds = np.full(len(positive), np.nan, np.float32)
  for label in range(len(positive)):
    if total_p[label, 0] == 0 or total_n[label, 0] == 0:
      continue
    starts = sorted_scores.group_starts(label)                 # distinct scores
    best = starts[::-1][np.argmax(j[label, starts][::-1])]   # last maximum: highest threshold
    thresholds[label] = sorted_scores.scores[label, best]
  return thresholds


# --- Results ---------------------------------------------------------------------------------------

def _none_if_nan(value):
  value = float(value)
  return None if math.isnan(value) else value


def _threshold_metrics(stats):
  """F1, accuracy, sensitivity, specificity (L,) from counts; NaN where undefined."""
  tp, fp, fn, tn = (np.asarray(stats[k], np.float64) for k in ("tp", "fp", "fn", "tn"))
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"F1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan)}


def _averages(per_label, weights):
  """{"macro": {...}, "weighted": {...}} over labels whose value is defined (not NaN)."""
  out = {"macro": {}, "weighted": {}}
  for name, values in per_label.items():
    values = np.asarray(values, np.float64)
    defined = ~np.isnan(values)
    out["macro"][name] = _none_if_nan(values[defined].mean()) if defined.any() else None
    w = weights * defined
    out["weighted"][name] = (_none_if_nan(np.sum(values[defined] * w[defined]) / w.sum())
                             if w.sum() > 0 else None)
  return out


def _bootstrap_intervals(sorted_scores, cut, num_samples, seed, level):
  """{metric: (L, 2)} per-label and {metric: [lo, hi]} macro percentile intervals."""
  n = sorted_scores.positive.shape[1]
  samples = bootstrap.run_replicates(lambda counts: _replicate_stats(counts, sorted_scores, cut),
                                     seed, num_samples, n)
  per_label, macro = {}, {}
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)   # undefined labels: all-NaN replicates
    for name, values in samples.items():
      values = np.asarray(values, np.float64)
      per_label[name] = bootstrap.percentile_interval(values, level).T      # (L, 2)
      macro[name] = bootstrap.percentile_interval(np.nanmean(values, axis=1), level)
  return per_label, macro


def _interval(pair):
  lo, hi = (_none_if_nan(v) for v in pair)
  return None if lo is None or hi is None else [lo, hi]


def classification_metrics(scores, labels, label_names, *, thresholds=None,
                           threshold_source="evaluated split", bootstrap_samples=0, seed=0,
                           level=0.95):
  """The metrics.json "zeroshot" section from (N, L) P(present) and (N, L) 0/1 labels.

  thresholds: (L,) operating points (e.g. youden_thresholds on the validation split); None =
  Youden's J on these scores themselves (optimistic; `threshold_source` says which was used).
  Returns {label: {"AUROC", "AUPRC", "F1", "accuracy", "sensitivity", "specificity",
  "threshold", "n_positive", "prevalence", "defined", "ci": {...}}, "macro": {...},
  "weighted": {...}, "n", "threshold_source", "ci": {"level", "samples", "seed"}}; AUROC and
  AUPRC are fractions in [0, 1], None where undefined.
  """
  scores, labels = np.asarray(scores, np.float32), np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 2:
    raise ZeroShotError(f"zero-shot scores {scores.shape} and labels {labels.shape} must both be "
                        f"(N, L)")
  if len(label_names) != labels.shape[1]:
    raise ZeroShotError(f"{len(label_names)} label names for {labels.shape[1]} label columns")
  labels = (labels > 0).astype(np.int8)
  sorted_scores = SortedScores.of(scores, labels)
  if thresholds is None:
    thresholds = _youden_thresholds(sorted_scores)
  thresholds = np.asarray(thresholds, np.float32)
  cut = sorted_scores.cut(np.where(np.isnan(thresholds), np.inf, thresholds))
  stats = _point_stats(sorted_scores, cut)
  per_label = {"AUROC": stats["AUROC"], "AUPRC": stats["AUPRC"], **_threshold_metrics(stats)}
  n_positive = labels.sum(axis=0)
  n = labels.shape[0]
  if bootstrap_samples:
    label_ci, macro_ci = _bootstrap_intervals(sorted_scores, cut, int(bootstrap_samples), seed,
                                              level)
  result = {}
  for j, name in enumerate(label_names):
    entry = {metric: _none_if_nan(values[j]) for metric, values in per_label.items()}
    entry.update(threshold=_none_if_nan(thresholds[j]), n_positive=int(n_positive[j]),
                 prevalence=float(n_positive[j] / n),
                 defined=bool(0 < n_positive[j] < n))
    if bootstrap_samples:
      entry["ci"] = {metric: _interval(label_ci[metric][j]) for metric in BOOTSTRAP_METRICS}
    result[str(name)] = entry
  result.update(_averages(per_label, n_positive.astype(np.float64)))
  if bootstrap_samples:
    result["macro"]["ci"] = {metric: _interval(macro_ci[metric]) for metric in BOOTSTRAP_METRICS}
    result["ci"] = {"level": level, "samples": int(bootstrap_samples), "seed": int(seed)}
  result["labels"] = [str(name) for name in label_names]
  result["n"] = int(n)
  result["threshold_source"] = threshold_source
  return result


# --- Table -----------------------------------------------------------------------------------------

def _cell(value, interval=None, digits=3):
  if value is None:
    return "undefined"
  text = f"{value:.{digits}f}"
  if interval:
    text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
  return text


def format_table(section, digits=3):
  """Text table of a "zeroshot" section: label, n+, AUROC [CI], AUPRC, F1, with chance levels
  (AUROC 0.5; AUPRC and the F1 of calling every study present follow from the prevalence)."""
  header = ["finding", "n+", "AUROC", "AUPRC (chance)", "F1 (chance)", "sens", "spec"]
  rows = []
  for name in section["labels"] + ["macro"]:
    entry = section[name]
    ci = entry.get("ci") or {}
    if name == "macro":
      chance_ap = chance_f1 = None
      positives = ""
    else:
      p = entry["prevalence"]
      chance_ap, chance_f1 = p, (2 * p / (1 + p) if p > 0 else 0.0)
      positives = str(entry["n_positive"])
    with_chance = lambda v, c: _cell(v, None, digits) + (  # noqa: E731
        "" if c is None else f" ({c:.{digits}f})")
    rows.append([name, positives, _cell(entry["AUROC"], ci.get("AUROC"), digits),
                 with_chance(entry["AUPRC"], chance_ap), with_chance(entry["F1"], chance_f1),
                 _cell(entry.get("sensitivity"), None, 2), _cell(entry.get("specificity"), None, 2)])
  widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                     for c, (cell, w) in enumerate(zip(row, widths))) for row in [header] + rows]
  level = section.get("ci", {}).get("level")
  note = (f"zero-shot on N={section['n']} (AUROC chance 0.5"
          + (f"; [{level:.0%} CI]" if level else "")
          + f"; thresholds: Youden's J on the {section['threshold_source']})")
  return note + "\n" + "\n".join(lines)

