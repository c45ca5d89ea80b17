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
]

UNRELATED = [
    ("Atelectasis in the left base, effusion is absent.", "effusion"),
    ("Nodular thickening of the fissure.", "nodule"),
    ("Passive atelectasis.", "mass"),
    ("Pleural thickening. Effusion is seen elsewhere.", "pleural effusion"),
]


@pytest.mark.parametrize("report,keyword", NEGATED, ids=[r for r, _ in NEGATED])
def test_negated_mentions_are_not_relevant(report, keyword):
  assert not findings.states_finding(report, keyword)


@pytest.mark.parametrize("report,keyword", STATED, ids=[r for r, _ in STATED])
def test_stated_findings_are_relevant(report, keyword):
  assert findings.states_finding(report, keyword)


@pytest.mark.parametrize("report,keyword", UNRELATED, ids=[r for r, _ in UNRELATED])
def test_other_words_and_other_findings_are_not_relevant(report, keyword):
  assert not findings.states_finding(report, keyword)


def test_keyword_relevance_is_one_bool_per_report_and_empty_reports_are_not_relevant():
  reports = ["Left lower lobe atelectasis.", "No atelectasis.", "", "Atelectasis. No effusion."]
  relevance = findings.keyword_relevance(reports, "atelectasis")
  assert relevance.dtype == bool
  np.testing.assert_array_equal(relevance, [True, False, False, True])


def test_relevance_matrix_has_a_row_per_keyword():
  reports = ["Right pleural effusion.", "No effusion; atelectasis.", "Normal study."]
  matrix = findings.relevance_matrix(reports, ["effusion", "atelectasis"])
  np.testing.assert_array_equal(matrix, [[True, False, False], [False, True, False]])


def test_an_empty_keyword_is_an_error():
  with pytest.raises(ValueError, match="keyword"):
    findings.keyword_relevance(["text"], "  ")
