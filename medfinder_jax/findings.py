"""Does a report state a finding? Keyword relevance for keyword retrieval (P@K), with negation.

The released code counted a study as relevant when the keyword was a substring of its text, so
"No atelectasis." counted as an atelectasis study. Here a report is relevant to a keyword only when
at least one mention of it is affirmed. Rules (NegEx-style, for English radiology reports):

- Matching is case-insensitive on whole words, with inflections of the last word: plurals
  (effusion/effusions, nodule/nodules, adenopathy/adenopathies, atelectasis/atelectases,
  sinus/sinuses), whichever of the two the keyword is given in, and the
  -asis/-osis adjectives (atelectatic, fibrotic). Single-word keywords of 6+ letters also match as
  the end of a compound (lymphadenopathy for adenopathy, micronodules for nodule).
- A report is split into sentences (. ! ? ; : and line breaks, not decimal points) and sentences
  into clauses at contrast words ("but", "however", "although", "except", "there is", ...).
- A mention is negated by a trigger before it in its clause ("no", "not", "without", "nor",
  "negative for", "free of", "absence of", "rule out", "resolution of", ...), which covers lists
  ("No effusion or atelectasis."), or by a trigger after it ("is not seen", "are absent",
  "has resolved", "cannot be excluded") within 8 words; a trailing trigger reaches back over a
  comma only when its verb is plural ("Effusion, atelectasis and nodules are not seen.").
- Hedged-out mentions ("cannot be excluded", "rule out") do not state the finding either.
- Phrases that look negative but are not ("no change in the nodule", "no interval increase",
  "not only") are ignored as triggers.
"""

import functools
import re

import numpy as np

_SENTENCE_BREAK = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?;:\n]")
_CLAUSE_BREAK = re.compile(
    r",?\s*\b(?=(?:but|however|although|though|except|apart from|aside from|whereas|"
    r"nevertheless|yet|which|there (?:is|are|was|were))\b)")
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|without)\s+(?:(?:significant|interval|substantial|further|major)\s+)*"
    r"(?:change|changes|increase|decrease|progression|worsening|growth)\b|\bnot only\b")
_ABSENT_PARTICIPLES = (r"(?:seen|identified|present|visuali[sz]ed|visible|demonstrated|observed|"
                       r"detected|appreciated|evident|noted|found)")
# "not"/"no" open a negation scope unless they are the "is not seen" / "no longer seen" kind,
# which look back at the mention before them instead.
_PRE_NEGATION = re.compile(
    r"\b(?:no(?!\s+longer)|not(?!\s+" + _ABSENT_PARTICIPLES + r")|without|nor|neither|"
    r"negative for|free of|absence of|rule out|rules out|ruling out|resolution of)\b")
_POST_NEGATION = re.compile(
    r"\b(?:(?P<aux>is|are|was|were|has been|have been|has|have)\s+)?"
    r"(?:no longer\s+" + _ABSENT_PARTICIPLES + r"|not\s+" + _ABSENT_PARTICIPLES + r"|"
    r"absent|resolved|ruled out|excluded)\b")
_PLURAL_AUX = {"are", "were", "have been", "have"}
_POST_WINDOW_WORDS = 8


def _singular(word):
  """A plural keyword ("nodules", "masses", "adenopathies", "sinuses") to its singular."""
  if word.endswith("ies"):
    return word[:-3] + "y"
  if word.endswith(("sses", "uses", "xes", "ches", "shes")):
    return word[:-2]
  if word.endswith("s") and not word.endswith(("ss", "is", "us")):
    return word[:-1]
  return word


def _inflections(word):
  """Surface forms of a singular noun: plurals and the -asis/-osis adjective."""
  forms = {word, word + "s", word + "es"}
  if word.endswith("y"):
    forms.add(word[:-1] + "ies")
  if word.endswith("is"):
    forms.add(word[:-2] + "es")             # atelectasis -> atelectases
  if word.endswith(("asis", "osis")):
    forms.add(word[:-3] + "tic")            # atelectasis -> atelectatic, fibrosis -> fibrotic
  return sorted(forms, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def keyword_pattern(keyword):
  """Compiled regex matching mentions of `keyword` (one or more words) in lower-case text."""
  words = re.split(r"[\s\-]+", keyword.strip().lower())
  if not words or not words[-1]:
    raise ValueError(f"keyword must contain a word, got {keyword!r}")
  last = _singular(words[-1])
  forms = set(_inflections(last))
  if words[-1].endswith("es"):   # "atelectases", "metastases": plurals of -is nouns too
    forms.update(_inflections(words[-1][:-2] + "is"))
  forms = sorted(forms, key=len, reverse=True)
  body = r"[\s\-]+".join([re.escape(w) for w in words[:-1]]
                         + ["(?:" + "|".join(map(re.escape, forms)) + ")"])
  compound = r"\w*" if len(words) == 1 and len(last) >= 6 else ""
  return re.compile(r"\b" + compound + body + r"\b")


def _clauses(text):
  """Lower-cased clauses of a report, with pseudo-negations blanked out (same length)."""
  text = _PSEUDO_NEGATION.sub(lambda m: " " * len(m.group()), text.lower())
  for sentence in _SENTENCE_BREAK.split(text):
    yield from _CLAUSE_BREAK.split(sentence)


def _negated_before(clause, start):
  return _PRE_NEGATION.search(clause, 0, start) is not None


def _negated_after(clause, end):
  for trigger in _POST_NEGATION.finditer(clause, end):
    between = clause[end:trigger.start()]
    if len(between.split()) > _POST_WINDOW_WORDS:
      return False
    if "," in between and trigger.group("aux") not in _PLURAL_AUX:
      continue
    return True
  return False


def states_finding(report, keyword):
  """True when `report` has at least one affirmed (not negated) mention of `keyword`."""
  if not isinstance(report, str) or not report:
    return False
  pattern = keyword_pattern(keyword)
  for clause in _clauses(report):
    for mention in pattern.finditer(clause):
      if not (_negated_before(clause, mention.start()) or _negated_after(clause, mention.end())):
        return True
  return False


def keyword_relevance(reports, keyword):
  """(N,) bool: report i states the finding `keyword` (see module docstring for the rules)."""
  keyword_pattern(keyword)   # validates the keyword once
  return np.array([states_finding(r, keyword) for r in reports], dtype=bool)


def relevance_matrix(reports, keywords):
  """(Q, N) bool: keyword_relevance of each of Q keywords over N reports."""
  return np.stack([keyword_relevance(reports, k) for k in keywords]) if len(keywords) else (
      np.zeros((0, len(reports)), bool))


# --- Mentions with their place, for highlighting (search results) -------------------------------

def _pieces(pattern, text, start, end):
  """(start, end) of the parts of text[start:end] between matches of `pattern` (as re.split)."""
  position = start
  for match in pattern.finditer(text, start, end):
    yield position, match.start()
    position = match.end()
  yield position, end


def mentions(report, keyword):
  """[(start, end, negated)] of every mention of `keyword` in `report` (character offsets into
  `report`), by the rules of states_finding: states_finding is True exactly when one of them is
  not negated."""
  if not isinstance(report, str) or not report:
    return []
  pattern = keyword_pattern(keyword)
  text = _PSEUDO_NEGATION.sub(lambda m: " " * len(m.group()), report.lower())
  found = []
  for s_start, s_end in _pieces(_SENTENCE_BREAK, text, 0, len(text)):
    for c_start, c_end in _pieces(_CLAUSE_BREAK, text, s_start, s_end):
      clause = text[c_start:c_end]
      for mention in pattern.finditer(clause):
        negated = (_negated_before(clause, mention.start())
                   or _negated_after(clause, mention.end()))
        found.append((c_start + mention.start(), c_start + mention.end(), bool(negated)))
  return found
