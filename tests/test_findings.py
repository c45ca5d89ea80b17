"""Keyword relevance: a report is relevant only when it states the finding (negation-aware)."""

import numpy as np
import pytest

from medfinder_jax import findings

NEGATED = [
    ("No pleural effusion.", "effusion"),
    ("There is no evidence of consolidation.", "consolidation"),
    ("Lungs without consolidation.", "consolidation"),
    ("Negative for adenopathy.", "adenopathy"),
    ("No signs of mediastinal lymphadenopathy.", "adenopathy"),
    ("Pleural effusion is not seen.", "effusion"),
    ("Effusion is absent.", "effusion"),
    ("No effusion or atelectasis.", "atelectasis"),
    ("No pleural effusion, pneumothorax, consolidation or atelectasis.", "atelectasis"),
    ("Effusion, atelectasis and consolidation are not seen.", "atelectasis"),
    ("Atelectasis has resolved.", "atelectasis"),
    ("Consolidation cannot be excluded.", "consolidation"),
    ("Absence of nodules.", "nodule"),
    ("The previously described effusion is no longer seen.", "effusion"),
    ("NO ATELECTASIS", "atelectasis"),
    ("No masses.", "mass"),
    ("No pleural effusion.", "pleural effusion"),
    # A pseudo-negation's words do not count towards the 8-word window of a trailing trigger.
    ("Pleural effusion with no significant interval change in size is not seen.", "effusion"),
    # Exactly 8 words between the mention and the trigger: still in its window.
    ("Effusion in the costophrenic recess of the right side is not seen.", "effusion"),
    # A plural verb reaches back over commas even after a singular one that does not.
    ("Pleural effusion, nodule is not seen, consolidation and atelectasis are absent.",
     "effusion"),
]

STATED = [
    ("Small left pleural effusion.", "effusion"),
    ("Bilateral pleural effusions.", "effusion"),
    ("Mediastinal lymphadenopathy.", "adenopathy"),
    ("Adenopathies in the right hilum.", "adenopathy"),
    ("Multiple pulmonary nodules.", "nodule"),
    ("Multiple pulmonary nodules.", "nodules"),
    ("Calcified micronodules in both lungs.", "nodule"),
    ("Bibasilar atelectatic changes.", "atelectasis"),
    ("Subsegmental atelectases in both bases.", "atelectasis"),
    ("Bibasilar atelectasis.", "atelectases"),
    ("Hepatic metastasis in segment 7.", "metastases"),
    ("No effusion. Atelectasis in the left lower lobe.", "atelectasis"),
    ("No effusion, but there is atelectasis at the right base.", "atelectasis"),
    ("Effusion is not seen, atelectasis at the left base.", "atelectasis"),
    ("Atelectasis in the left base, effusion is absent.", "atelectasis"),
    ("No change in the right upper lobe nodule.", "nodule"),
    ("Without significant change in the consolidation.", "consolidation"),
    ("Nodule of 1.5 cm in the right upper lobe. No effusion.", "nodule"),
    ("Findings: consolidation in the lingula.", "consolidation"),
    ("Right pleural effusions.", "pleural effusion"),
    ("Masses in the liver.", "masses"),
    ("Effusion, no atelectasis.", "effusion"),         # a trigger after the mention: its own
    # 9 words between the mention and the trigger: outside its window.
    ("Effusion in the posterior costophrenic recess of the right side is not seen.", "effusion"),
    ("Fibrotic changes in both lower lobes.", "fibrosis"),
    ("Aortic stenoses.", "stenosis"),
]

# Keywords given in the plural match the singular and the plural (and only their own word).
PLURAL_KEYWORDS = [
    ("opacities", "opacity", "opacities"),
    ("abscesses", "abscess", "abscesses"),
    ("patches", "patch", "patches"),
    ("rashes", "rash", "rashes"),
    ("appendixes", "appendix", "appendixes"),
    ("sinuses", "sinus", "sinuses"),
    ("calcifications", "calcification", "calcifications"),
]
# Singular keywords ending in s (-ss, -is, -us) are not mistaken for plurals.
SINGULAR_KEYWORDS_IN_S = [
    ("glass", "glass", "glasses"),
    ("stenosis", "stenosis", "stenoses"),
    ("sinus", "sinus", "sinuses"),
]

UNRELATED = [
    ("Atelectasis in the left base, effusion is absent.", "effusion"),
    ("Nodular thickening of the fissure.", "nodule"),
    ("Passive atelectasis.", "mass"),
    ("Pleural thickening. Effusion is seen elsewhere.", "pleural effusion"),
]


@pytest.fixture(autouse=True)
def compile_keywords_afresh():
  """Each test compiles the keyword patterns it uses (they are cached across calls): a test then
  checks the inflection rules itself, and mutation testing sees which tests reach them."""
  findings.keyword_pattern.cache_clear()


@pytest.mark.parametrize("report,keyword", NEGATED, ids=[r for r, _ in NEGATED])
def test_negated_mentions_are_not_relevant(report, keyword):
  assert not findings.states_finding(report, keyword)


@pytest.mark.parametrize("report,keyword", STATED, ids=[r for r, _ in STATED])
def test_stated_findings_are_relevant(report, keyword):
  assert findings.states_finding(report, keyword)


@pytest.mark.parametrize("report,keyword", UNRELATED, ids=[r for r, _ in UNRELATED])
def test_other_words_and_other_findings_are_not_relevant(report, keyword):
  assert not findings.states_finding(report, keyword)


@pytest.mark.parametrize("keyword,singular,plural", PLURAL_KEYWORDS + SINGULAR_KEYWORDS_IN_S,
                         ids=[k for k, _, _ in PLURAL_KEYWORDS + SINGULAR_KEYWORDS_IN_S])
def test_a_keyword_matches_its_singular_and_plural(keyword, singular, plural):
  assert findings.states_finding(f"Small {singular} on the left.", keyword)
  assert findings.states_finding(f"Small {plural} on the left.", keyword)
  assert not findings.states_finding(f"Small {singular}x on the left.", keyword)


def test_keyword_relevance_is_one_bool_per_report_and_missing_reports_are_not_relevant():
  reports = ["Left lower lobe atelectasis.", "No atelectasis.", "", "Atelectasis. No effusion.",
             None, float("nan")]                  # a CSV's empty cell reads as NaN
  relevance = findings.keyword_relevance(reports, "atelectasis")
  assert relevance.dtype == bool
  np.testing.assert_array_equal(relevance, [True, False, False, True, False, False])
  assert findings.keyword_relevance([], "atelectasis").dtype == bool


def test_relevance_matrix_has_a_row_per_keyword():
  reports = ["Right pleural effusion.", "No effusion; atelectasis.", "Normal study."]
  matrix = findings.relevance_matrix(reports, ["effusion", "atelectasis"])
  np.testing.assert_array_equal(matrix, [[True, False, False], [False, True, False]])
  empty = findings.relevance_matrix(reports, [])
  assert empty.shape == (0, 3) and empty.dtype == bool


def test_mentions_give_each_mention_in_place_with_its_negation():
  report = "No effusion. Small left EFFUSION, but there is no change in the nodule; nodules absent."
  assert findings.mentions(report, "effusion") == [(3, 11, True), (24, 32, False)]
  assert findings.mentions(report, "nodule") == [(64, 70, False), (72, 79, True)]
  assert [report[s:e] for s, e, _ in findings.mentions(report, "nodule")] == ["nodule", "nodules"]
  for missing in ("", None, float("nan")):
    assert findings.mentions(missing, "nodule") == []


@pytest.mark.parametrize("report,keyword", NEGATED + STATED + UNRELATED,
                         ids=[r for r, _ in NEGATED + STATED + UNRELATED])
def test_a_report_states_a_finding_exactly_when_one_mention_is_not_negated(report, keyword):
  found = findings.mentions(report, keyword)
  assert any(not negated for _, _, negated in found) == findings.states_finding(report, keyword)
  pattern = findings.keyword_pattern(keyword)
  for start, end, _ in found:
    assert pattern.fullmatch(report[start:end].lower()), report[start:end]


def test_an_empty_keyword_is_an_error():
  with pytest.raises(ValueError, match="keyword"):
    findings.keyword_relevance(["text"], "  ")
