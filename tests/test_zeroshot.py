"""Zero-shot classification: AUROC/AUPRC against scikit-learn, operating points, undefined labels,
prompts, ensembling and the bootstrap."""

import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk

from medfinder_jax import bootstrap
from medfinder_jax import zeroshot


def labelled_scores(n, num_labels, seed, tie_levels=None):
  """(scores, labels) (N, L): scores shifted up for positives; with tie_levels, rounded onto that
  many levels so that many scores tie."""
  rng = np.random.default_rng(seed)
  labels = rng.random((n, num_labels)) < rng.uniform(0.1, 0.6, num_labels)
  scores = rng.random((n, num_labels)) + 0.4 * labels
  if tie_levels:
    scores = np.round(scores * tie_levels) / tie_levels
  return scores.astype(np.float32), labels.astype(np.int8)


def names(num_labels):
  return [f"finding {j}" for j in range(num_labels)]


@pytest.mark.parametrize("tie_levels", [None, 7, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_and_auprc_equal_scikit_learn_per_label(seed, tie_levels):
  scores, labels = labelled_scores(400, 5, seed, tie_levels)
  result = zeroshot.classification_metrics(scores, labels, names(5))
  for j, name in enumerate(names(5)):
    assert result[name]["AUROC"] == pytest.approx(sk.roc_auc_score(labels[:, j], scores[:, j]),
                                                  abs=1e-6)
    assert result[name]["AUPRC"] == pytest.approx(
        sk.average_precision_score(labels[:, j], scores[:, j]), abs=1e-6)


def test_every_score_tied_is_chance_not_a_perfect_classifier():
  labels = np.array([[0], [1], [0], [1], [1]], np.int8)
  result = zeroshot.classification_metrics(np.full((5, 1), 0.5, np.float32), labels, ["x"])
  assert result["x"]["AUROC"] == 0.5
  assert result["x"]["AUPRC"] == pytest.approx(0.6)   # = prevalence


def test_label_without_positives_or_negatives_is_undefined_not_half():
  scores, labels = labelled_scores(100, 3, seed=2)
  labels[:, 1] = 0
  labels[:, 2] = 1
  result = zeroshot.classification_metrics(scores, labels, names(3), bootstrap_samples=50)
  for name in names(3)[1:]:
    assert result[name]["AUROC"] is None and result[name]["AUPRC"] is None
    assert set(result[name]["ci"]) == {"AUROC", "F1"}
    assert result[name]["defined"] is False
    assert result[name]["ci"]["AUROC"] is None
  assert result["finding 1"]["n_positive"] == 0 and result["finding 2"]["prevalence"] == 1.0
  assert result["macro"]["AUROC"] == pytest.approx(result["finding 0"]["AUROC"])
  assert "undefined" in zeroshot.format_table(result)


def test_macro_and_weighted_averages_over_defined_labels():
  scores, labels = labelled_scores(300, 4, seed=3)
  result = zeroshot.classification_metrics(scores, labels, names(4))
  aurocs = np.array([result[n]["AUROC"] for n in names(4)])
  positives = labels.sum(axis=0)
  assert result["macro"]["AUROC"] == pytest.approx(aurocs.mean())
  assert result["weighted"]["AUROC"] == pytest.approx(np.sum(aurocs * positives) /
                                                      positives.sum())


def test_youden_threshold_maximizes_sensitivity_plus_specificity():
  scores, labels = labelled_scores(250, 3, seed=4, tie_levels=50)
  thresholds = zeroshot.youden_thresholds(scores, labels)
  for j in range(3):
    fpr, tpr, cuts = sk.roc_curve(labels[:, j], scores[:, j])
    j_stat = tpr - fpr
    best = np.flatnonzero(j_stat == j_stat.max())
    assert thresholds[j] == pytest.approx(cuts[best[0]])   # ties: the highest threshold


def test_operating_point_from_validation_is_applied_to_the_evaluated_split():
  val_scores, val_labels = labelled_scores(300, 2, seed=5)
  test_scores, test_labels = labelled_scores(300, 2, seed=6)
  test_scores = test_scores + 0.2                            # a shift the validation did not see
  thresholds = zeroshot.youden_thresholds(val_scores, val_labels)
  result = zeroshot.classification_metrics(test_scores, test_labels, names(2),
                                           thresholds=thresholds, threshold_source="val")
  for j, name in enumerate(names(2)):
    predicted = test_scores[:, j] >= thresholds[j]
    truth = test_labels[:, j] > 0
    assert result[name]["threshold"] == pytest.approx(float(thresholds[j]))
    assert result[name]["F1"] == pytest.approx(sk.f1_score(truth, predicted))
    assert result[name]["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert result[name]["sensitivity"] == pytest.approx(sk.recall_score(truth, predicted))
    assert result[name]["specificity"] == pytest.approx(
        sk.recall_score(~truth, ~predicted))
  own = zeroshot.classification_metrics(test_scores, test_labels, names(2))
  assert own["finding 0"]["threshold"] != result["finding 0"]["threshold"]
  assert result["threshold_source"] == "val"


def test_bootstrap_replicate_is_the_weighted_metric_of_resampled_studies():
  scores, labels = labelled_scores(200, 3, seed=7, tie_levels=20)
  sorted_scores = zeroshot.SortedScores.of(scores, labels)
  cut = sorted_scores.cut(np.full(3, 0.5))
  counts = bootstrap.resample_counts(11, 0, 2, 200)
  replicates = zeroshot._replicate_stats(counts, sorted_scores, cut)
  for b in range(2):
    drawn = np.repeat(np.arange(200), counts[:, b])       # the resampled studies, as a multiset
    for j in range(3):
      assert float(replicates["AUROC"][b, j]) == pytest.approx(
          sk.roc_auc_score(labels[drawn, j], scores[drawn, j]), abs=1e-12)
      assert float(replicates["F1"][b, j]) == pytest.approx(
          sk.f1_score(labels[drawn, j], scores[drawn, j] >= 0.5), abs=1e-12)


def test_bootstrap_intervals_are_seeded_and_hold_the_point_estimate():
  scores, labels = labelled_scores(300, 2, seed=8)
  first = zeroshot.classification_metrics(scores, labels, names(2), bootstrap_samples=200, seed=3)
  again = zeroshot.classification_metrics(scores, labels, names(2), bootstrap_samples=200, seed=3)
  other = zeroshot.classification_metrics(scores, labels, names(2), bootstrap_samples=200, seed=4)
  assert first == again and first != other
  for name in names(2) + ["macro"]:
    lo, hi = first[name]["ci"]["AUROC"]
    assert lo < first[name]["AUROC"] < hi and hi - lo < 0.2
  assert first["ci"] == {"level": 0.95, "samples": 200, "seed": 3}


def prompt_cosines(image, prompts):
  """(N, L, 2) cosines of each image with each label's (positive, negative) prompt."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return np.einsum("nd,lsd->nls", unit(image), unit(prompts))


def reference_probabilities(image, prompts, scale):
  """The softmax over (positive, negative) of the scaled cosines, at the positive."""
  logits = scale * prompt_cosines(image, prompts)
  return np.exp(logits[..., 0]) / np.exp(logits).sum(axis=-1)


def test_probability_is_the_softmax_of_the_scaled_prompt_similarities():
  rng = np.random.default_rng(9)
  image, prompts = rng.normal(size=(6, 8)), rng.normal(size=(3, 2, 8))
  got = zeroshot.probabilities(image, prompts, scale=20.0)
  np.testing.assert_allclose(got, reference_probabilities(image, prompts, 20.0), rtol=1e-5)


def test_prompt_ensembling_averages_normalized_embeddings():
  rng = np.random.default_rng(10)
  flat = rng.normal(size=(2 * 3 * 2, 5))                      # 2 labels, 3 templates
  flat[0] *= 100.0                                            # a long vector must not dominate
  merged = zeroshot.ensemble(flat, num_labels=2, num_templates=3)
  unit = flat / np.linalg.norm(flat, axis=-1, keepdims=True)
  mean = unit.reshape(2, 3, 2, 5).mean(axis=1)
  np.testing.assert_allclose(merged, mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             rtol=1e-5)


def test_prompts_come_in_label_template_side_order():
  templates = (("{label}.", "No {label}."), ("{label} is present.", "{label} is not present."))
  assert zeroshot.prompts(["Emphysema", "Lung nodule"], templates) == [
      "Emphysema.", "No Emphysema.", "Emphysema is present.", "Emphysema is not present.",
      "Lung nodule.", "No Lung nodule.", "Lung nodule is present.", "Lung nodule is not present."]


@pytest.mark.parametrize("templates", [(), (("{label}",),), (("no label", "No {label}."),)])
def test_templates_need_pairs_with_the_label_placeholder(templates):
  with pytest.raises(zeroshot.ZeroShotError, match="eval.zeroshot.templates"):
    zeroshot.ZeroShotSettings(templates=templates)


def test_table_lists_each_label_with_positives_ci_and_chance():
  scores, labels = labelled_scores(200, 2, seed=12)
  table = zeroshot.format_table(zeroshot.classification_metrics(scores, labels, names(2),
                                                                bootstrap_samples=50))
  assert "AUROC chance 0.5" in table
  row = next(line for line in table.splitlines() if line.startswith("finding 0"))
  assert str(int(labels[:, 0].sum())) in row and "[" in row



# --- Settings, the table, a label ranked backwards (mutation testing) ----------------------------

def test_settings_keep_valid_templates_and_findings_as_tuples():
  """The config gives lists; settings hold them as (positive, negative) tuples."""
  settings = zeroshot.ZeroShotSettings(templates=[["{label} seen.", "No {label} seen."]],
                                       findings=["emphysema", "pleural effusion"])
  assert settings.templates == (("{label} seen.", "No {label} seen."),)
  assert settings.findings == ("emphysema", "pleural effusion")
  assert zeroshot.ZeroShotSettings().templates == zeroshot.DEFAULT_TEMPLATES


@pytest.mark.parametrize("findings", [("emphysema", ""), ("emphysema", "  "), ("emphysema", 3)])
def test_findings_must_be_names(findings):
  with pytest.raises(zeroshot.ZeroShotError, match="eval.zeroshot.findings"):
    zeroshot.ZeroShotSettings(findings=findings)


def test_settings_from_config_eval_zeroshot_or_disabled_without_it():
  config = ml_collections.ConfigDict({
      "enabled": 0, "templates": [["{label} seen.", "No {label}."]], "findings": ["emphysema"],
      "threshold_split": None})
  assert zeroshot.ZeroShotSettings.from_config(config) == zeroshot.ZeroShotSettings(
      enabled=False, templates=(("{label} seen.", "No {label}."),), findings=("emphysema",),
      threshold_split="")
  config.enabled, config.threshold_split = True, "val"
  settings = zeroshot.ZeroShotSettings.from_config(config)
  assert settings.enabled is True and settings.threshold_split == "val"
  assert zeroshot.ZeroShotSettings.from_config(None).enabled is False


def test_auroc_and_auprc_of_a_label_ranked_backwards_equal_scikit_learn():
  """Positives scored low: the highest score is a negative study's, which the well-ranked
  labels of the other tests never have."""
  scores, labels = labelled_scores(200, 3, seed=13)
  scores = 1.0 - scores
  result = zeroshot.classification_metrics(scores, labels, names(3))
  for j, name in enumerate(names(3)):
    assert labels[np.argmax(scores[:, j]), j] == 0
    assert result[name]["AUROC"] == pytest.approx(sk.roc_auc_score(labels[:, j], scores[:, j]),
                                                  abs=1e-6)
    assert result[name]["AUPRC"] == pytest.approx(
        sk.average_precision_score(labels[:, j], scores[:, j]), abs=1e-6)


def test_table_layout_names_columns_aligns_them_and_marks_undefined_cells():
  section = {
      "labels": ["effusion", "nodule"], "n": 100, "threshold_source": "val split",
      "ci": {"level": 0.95, "samples": 50, "seed": 0},
      "effusion": {"AUROC": 0.8123, "AUPRC": 0.5, "F1": 0.61, "sensitivity": 0.7,
                   "specificity": 0.9, "n_positive": 25, "prevalence": 0.25,
                   "ci": {"AUROC": [0.75, 0.87]}},
      "nodule": {"AUROC": None, "AUPRC": None, "F1": None, "sensitivity": None,
                 "specificity": 1.0, "n_positive": 0, "prevalence": 0.0, "ci": {"AUROC": None}},
      "macro": {"AUROC": 0.8123, "AUPRC": 0.5, "F1": 0.61, "sensitivity": 0.7,
                "specificity": 0.9, "ci": {"AUROC": [0.75, 0.87]}}}
  assert zeroshot.format_table(section) == (
      "zero-shot on N=100 (AUROC chance 0.5; [95% CI]; thresholds: Youden's J on the val split)\n"
      "finding   n+                 AUROC     AUPRC (chance)        F1 (chance)       sens  spec\n"
      "effusion  25  0.812 [0.750, 0.870]      0.500 (0.250)      0.610 (0.400)       0.70  0.90\n"
      "nodule     0             undefined  undefined (0.000)  undefined (0.000)  undefined  1.00\n"
      "macro         0.812 [0.750, 0.870]              0.500              0.610       0.70  0.90")


def test_counts_at_every_operating_point_equal_scikit_learn():
  """Thresholds at each distinct score, below the lowest and above the highest (every study
  called present / absent), on labels whose two lowest-scoring studies are (positive, positive),
  (positive, negative) and (negative, positive): the edges of the called-present counts."""
  rng = np.random.default_rng(14)
  s = np.concatenate([[-2.0, -1.0], np.round(rng.random(28) * 8) / 8]).astype(np.float32)
  labels = (rng.random((30, 3)) < 0.4).astype(np.int8)
  labels[:2] = [[1, 1, 0], [1, 0, 1]]
  labels[2:4] = [[0, 0, 0], [1, 1, 1]]    # every label has both classes above the two lowest
  scores = np.repeat(s[:, None], 3, axis=1)
  for t in np.concatenate([np.unique(s), [s.min() - 1, s.max() + 1]]):
    result = zeroshot.classification_metrics(scores, labels, names(3), thresholds=np.full(3, t))
    for j, name in enumerate(names(3)):
      truth, predicted = labels[:, j] > 0, s >= t
      assert result[name]["sensitivity"] == pytest.approx(sk.recall_score(truth, predicted)), t
      assert result[name]["specificity"] == pytest.approx(sk.recall_score(~truth, ~predicted)), t
      assert result[name]["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted)), t
      assert result[name]["F1"] == pytest.approx(
          sk.f1_score(truth, predicted, zero_division=0.0)), t


def test_a_label_with_one_positive_is_defined():
  """One positive study is enough for AUROC (the share of negatives scored below it) and AUPRC."""
  scores, labels = labelled_scores(50, 1, seed=15)
  labels[:] = 0
  labels[7] = 1
  result = zeroshot.classification_metrics(scores, labels, ["x"])
  assert result["x"]["defined"] is True
  assert result["x"]["AUROC"] == pytest.approx(sk.roc_auc_score(labels[:, 0], scores[:, 0]))
  assert result["x"]["AUPRC"] == pytest.approx(
      sk.average_precision_score(labels[:, 0], scores[:, 0]))


def test_table_without_intervals_at_two_digits():
  section = {"labels": ["effusion"], "n": 8, "threshold_source": "evaluated split",
             "effusion": {"AUROC": 0.8123, "AUPRC": 0.5, "F1": 0.61, "sensitivity": 0.7,
                          "specificity": 0.9, "n_positive": 2, "prevalence": 0.25},
             "macro": {"AUROC": 0.8123, "AUPRC": 0.5, "F1": 0.61, "sensitivity": 0.7,
                       "specificity": 0.9}}
  lines = zeroshot.format_table(section, digits=2).splitlines()
  assert lines[0] == ("zero-shot on N=8 (AUROC chance 0.5; thresholds: Youden's J on the "
                      "evaluated split)")
  assert lines[2].split() == ["effusion", "2", "0.81", "0.50", "(0.25)", "0.61", "(0.40)",
                              "0.70", "0.90"]


def brute_force_youden(scores, labels):
  """Per label: the highest threshold t maximizing TPR - FPR of `score >= t` over the distinct
  scores; NaN without positives or negatives."""
  out = np.full(scores.shape[1], np.nan, np.float32)
  for j in range(scores.shape[1]):
    truth = labels[:, j] > 0
    if truth.all() or not truth.any():
      continue
    best = -np.inf
    for t in np.unique(scores[:, j])[::-1]:
      called = scores[:, j] >= t
      youden = called[truth].mean() - called[~truth].mean()
      if youden > best:
        best, out[j] = youden, t
  return out


def test_small_tied_labels_against_scikit_learn_and_a_brute_force_youden():
  """Many small labels with heavy ties, including single positives, single negatives, labels
  without either (listed first) and the two lowest scores tied: AUROC and AUPRC equal
  scikit-learn's, thresholds a brute-force Youden search, counts at them scikit-learn's."""
  rng = np.random.default_rng(16)
  scores = (np.round(rng.random((12, 40)) * 5) / 5).astype(np.float32)
  labels = (rng.random((12, 40)) < 0.4).astype(np.int8)
  labels[:, 0], labels[:, 1] = 0, 1                     # undefined, before the defined ones
  labels[:, 2], labels[5, 2] = 0, 1                     # a single positive
  labels[:, 3], labels[5, 3] = 1, 0                     # a single negative
  scores[:, 4] = np.linspace(0.2, 0.9, 12)
  scores[:2, 4] = 0.1                                   # exactly the two lowest tie
  labels[:, 4] = [0, 1] * 6
  thresholds = zeroshot.youden_thresholds(scores, labels)
  np.testing.assert_array_equal(thresholds, brute_force_youden(scores, labels))
  result = zeroshot.classification_metrics(scores, labels, names(40), thresholds=thresholds)
  for j, name in enumerate(names(40)[2:], start=2):
    truth, predicted = labels[:, j] > 0, scores[:, j] >= thresholds[j]
    assert result[name]["AUROC"] == pytest.approx(sk.roc_auc_score(truth, scores[:, j])), name
    assert result[name]["AUPRC"] == pytest.approx(
        sk.average_precision_score(truth, scores[:, j])), name
    assert result[name]["F1"] == pytest.approx(sk.f1_score(truth, predicted)), name
    assert result[name]["sensitivity"] == pytest.approx(sk.recall_score(truth, predicted)), name
    assert result[name]["specificity"] == pytest.approx(
        sk.recall_score(~truth, ~predicted)), name


def test_nothing_called_present_gives_zero_sensitivity_and_f1_and_full_specificity():
  """Above every score: one positive missed (F1 0, sensitivity 0) and one negative correctly
  absent (specificity 1); defined values, not NaN, even with a single study of a class."""
  scores = np.linspace(0.1, 0.9, 6, dtype=np.float32)[:, None].repeat(2, axis=1)
  labels = np.array([[0, 1], [1, 1], [0, 1], [0, 0], [0, 1], [0, 1]], np.int8)
  result = zeroshot.classification_metrics(scores, labels, names(2), thresholds=[2.0, 2.0])
  assert result["finding 0"]["F1"] == 0.0 and result["finding 0"]["sensitivity"] == 0.0
  assert result["finding 1"]["specificity"] == 1.0 and result["finding 1"]["defined"] is True


def test_a_replicate_drawing_the_single_positive_once_still_has_an_auroc():
  """A rare finding: replicates that draw its one positive (or the one negative) once are
  defined, and equal scikit-learn on the resampled studies; those that miss it are undefined."""
  rng = np.random.default_rng(12)
  scores = rng.random((40, 2)).astype(np.float32)
  labels = np.zeros((40, 2), np.int8)
  labels[7, 0] = 1                    # one positive
  labels[:, 1], labels[9, 1] = 1, 0   # one negative
  sorted_scores = zeroshot.SortedScores.of(scores, labels)
  counts = bootstrap.resample_counts(3, 0, 64, 40)
  replicates = zeroshot._replicate_stats(counts, sorted_scores, sorted_scores.cut([0.5, 0.5]))
  for column, single in ((0, 7), (1, 9)):
    drawn_once = np.flatnonzero(counts[single] == 1)
    assert len(drawn_once) > 5 and np.isnan(replicates["AUROC"][counts[single] == 0, column]).all()
    for b in drawn_once:
      drawn = np.repeat(np.arange(40), counts[:, b])
      assert replicates["AUROC"][b, column] == pytest.approx(
          sk.roc_auc_score(labels[drawn, column], scores[drawn, column]), abs=1e-12)


# --- Defaults, errors and averages a caller relies on (mutation testing) ---------------------------

def test_without_thresholds_or_bootstrap_the_result_says_so_and_counts_the_studies():
  """Called with defaults: thresholds from the evaluated split (said in the output), no
  intervals at all, N stated; the bootstrap's default seed is 0."""
  scores, labels = labelled_scores(120, 2, seed=21)
  result = zeroshot.classification_metrics(scores, labels, names(2))
  assert result["threshold_source"] == "evaluated split" and result["n"] == 120
  assert "ci" not in result and "ci" not in result["macro"]
  assert not any("ci" in result[name] for name in names(2))
  default_seed = zeroshot.classification_metrics(scores, labels, names(2), bootstrap_samples=30)
  seed_0 = zeroshot.classification_metrics(scores, labels, names(2), bootstrap_samples=30, seed=0)
  assert default_seed == seed_0 and default_seed["ci"]["seed"] == 0


def test_scores_and_labels_of_different_shapes_or_names_are_errors_naming_both():
  scores, labels = labelled_scores(5, 3, seed=22)
  with pytest.raises(zeroshot.ZeroShotError, match=r"scores \(5, 2\) and labels \(5, 3\)"):
    zeroshot.classification_metrics(scores[:, :2], labels, names(3))
  with pytest.raises(zeroshot.ZeroShotError, match=r"scores \(5,\) and labels \(5,\)"):
    zeroshot.classification_metrics(scores[:, 0], labels[:, 0], names(1))
  with pytest.raises(zeroshot.ZeroShotError, match="2 label names for 3 label columns"):
    zeroshot.classification_metrics(scores, labels, names(2))


def test_weighted_average_skips_an_undefined_label_and_holds_with_a_single_positive():
  """A finding without positives has weight 0 and no value: the weighted average is that of the
  defined labels, even when they hold one positive in all."""
  scores, labels = labelled_scores(60, 3, seed=23)
  labels[:, 1] = 0
  result = zeroshot.classification_metrics(scores, labels, names(3))
  defined, positives = [0, 2], labels.sum(axis=0)
  aurocs = np.array([result[names(3)[j]]["AUROC"] for j in defined])
  assert result["weighted"]["AUROC"] == pytest.approx(
      np.sum(aurocs * positives[defined]) / positives[defined].sum())
  labels[:, 2] = 0
  labels[:, 0] = 0
  labels[4, 0] = 1
  single = zeroshot.classification_metrics(scores, labels, names(3))
  assert single["weighted"]["AUROC"] == pytest.approx(
      sk.roc_auc_score(labels[:, 0], scores[:, 0]))


def test_probabilities_are_float32_and_saturate_without_overflow_at_a_huge_scale():
  rng = np.random.default_rng(24)
  image, prompts = rng.normal(size=(6, 8)), rng.normal(size=(3, 2, 8))
  assert zeroshot.probabilities(image, prompts, scale=20.0).dtype == np.float32
  with np.errstate(over="raise"):   # exp must not overflow: the clip keeps it finite
    saturated = zeroshot.probabilities(image, prompts, scale=1e6)
  cosine = prompt_cosines(image, prompts)
  np.testing.assert_array_equal(saturated, (cosine[..., 0] > cosine[..., 1]).astype(np.float32))
