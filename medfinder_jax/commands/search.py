"""`launch.py search`: ranked studies for a text or keyword query, ranked reports for a volume.

The query is encoded by the model recorded in the index (--model_path when it moved), which
must be the one that built it (same fingerprint: loading.identity_differences); a volume query
is preprocessed like the index's gallery volumes (the preprocessing the index records). The
result is a plain dict (the --json output), and `format_result` is its table.

`Session` (index + model, loaded once) turns a query into that dict; `launch.py serve` answers
every request through it, so the server's JSON is the command's by construction. Text and
keyword queries use the index's ANN index when it has a current one (--exact: brute force);
volume queries always search exactly. Each result carries its report's mentions of the query's
findings (with negated ones marked, findings.mentions) for highlighting.
"""

import os

from data_prep import preprocess
from data_prep import schema
from medfinder_jax import ann as ann_lib
from medfinder_jax import encode
from medfinder_jax import errors
from medfinder_jax import findings
from medfinder_jax import index as index_lib
from medfinder_jax import loading
from medfinder_jax import sharding

QUERY_KINDS = ("text", "keyword", "volume")


class SearchError(errors.UserError):
  """A query or an index that cannot be searched as asked."""


def run(config, index_dir, *, text=None, keyword=None, volume=None, top_k=None,
        model_path=None, exact=False):
  """The ranking of one query (see the module docstring); a user error for a bad query, index
  or model."""
  kind, value = query_kind(text, keyword, volume)
  top_k = checked_top_k(config, top_k)
  if kind == "keyword":
    _check_keyword(value)
  index = index_lib.load_index(index_dir)
  stored = None
  if kind == "volume":   # read before the model loads: a bad file fails fast
    stored = preprocess.volume_from_file(value, index_preprocessing(index),
                                         config.data.get("max_volume_mib"))
  session = Session(config, index, model_path)
  return session.answer(kind, value, top_k, exact=exact, volume=stored)


def checked_top_k(config, top_k, limit=None):
  """top_k as an int (default eval.search_top_k); a SearchError when below 1 or over `limit`."""
  try:
    top_k = int(config.eval.search_top_k if top_k is None else top_k)
  except (TypeError, ValueError):
    raise SearchError(f"--top_k {top_k!r}: expected a whole number") from None
  if top_k < 1:
    raise SearchError(f"--top_k must be at least 1, got {top_k}")
  if limit is not None and top_k > limit:
    raise SearchError(f"top_k {top_k} is over this server's limit of {limit}")
  return top_k


class Session:
  """An index and the model that built it, loaded once: the one path from a query to the
  result dict, for `launch.py search --json` and for every request of `launch.py serve`."""

  def __init__(self, config, index, model_path=None):
    self.config = config
    self.index = index
    self.mesh = sharding.single_device_mesh()
    self.loaded = load_index_model(index, config, model_path, self.mesh)
    self.ann, self.ann_note = ann_lib.load(index) if _has_ann(index) else (None, None)

  @property
  def preprocessing(self):
    return index_preprocessing(self.index)

  def encode_texts(self, values):
    return encode.texts(self.loaded.model, self.loaded.variables, self.loaded.tokenizer,
                        list(values), self.mesh, batch_size_per_device=1)

  def encode_volume(self, stored):
    return encode.volumes(self.loaded.model, self.loaded.variables, stored[None],
                          self.preprocessing.intensity, self.mesh)[0]

  def answer(self, kind, value, top_k, *, exact=False, volume=None, shown=None):
    """The result dict of one query. kind "text"/"keyword": `value` is the text; "volume":
    `volume` is the preprocessed record volume and `value` (or `shown`) names it."""
    if kind == "volume":
      query = self.encode_volume(volume)
    else:
      query = self.encode_texts([value])[0]
    results, method = self.rank(query, kind, top_k, exact)
    return _output(self, kind, value if shown is None else shown, results, method)

  def rank(self, query, kind, top_k, exact=False):
    """(SearchResults, {"method", ...}) of one query embedding: the ANN index for studies when
    there is a usable one and not `exact`, else exact search."""
    excerpt_chars = self.config.eval.excerpt_chars
    if kind != "volume" and self.ann is not None and not exact:
      queries = index_lib.query_vectors(self.index, query)
      rows, scores = self.ann.search(self.index, queries, top_k)
      return (index_lib.results_of(self.index, rows[0], scores[0], excerpt_chars),
              {"method": "ann", "kind": self.ann.meta["kind"],
               "recall_at_10": self.ann.meta["recall_at_10"]})
    method = {"method": "exact"}
    if self.ann_note and not exact and kind != "volume":
      method["note"] = self.ann_note
    return search_embedding(self.index, query, kind, top_k, excerpt_chars), method


def _has_ann(index):
  return os.path.isdir(os.path.join(index.directory, ann_lib.ANN_DIR))


def load_index_model(index, config, model_path=None, mesh=None):
  """The model that built `index` (or `model_path`), checked against the index's record."""
  recorded = index.meta.get("model", {})
  path = model_path or recorded.get("checkpoint", "")
  if not model_path and path and not os.path.exists(path):
    raise SearchError(f"{index.directory}: built by the model at {path}, which no longer "
                      f"exists; pass --model_path with the same model's new location")
  loaded = loading.load_model(path, config, recorded=recorded, mesh=mesh)
  differ = loading.identity_differences(recorded, loaded.identity)
  if differ:
    show = lambda m: ", ".join(f"{f}={str(m.get(f))[:16]}" for f in loading.IDENTITY_FIELDS)
    raise SearchError(
        f"{index.directory}: index built by another model ({', '.join(differ)} differ): index "
        f"has {show(recorded)} (checkpoint {recorded.get('checkpoint') or '?'}), the query model "
        f"has {show(loaded.identity)} (checkpoint {loaded.identity.get('checkpoint') or '?'}); "
        f"rebuild the index with this model (launch.py embed)")
  return loaded


def index_preprocessing(index):
  """PreprocessParams of the index's gallery volumes (volume queries must match them)."""
  recorded = index.meta.get("model", {}).get("preprocess")
  source = os.path.join(index.directory, index_lib.META_FILE)
  if recorded is None:
    raise SearchError(f"{source}: the index records no volume preprocessing, so a volume query "
                      f"cannot be prepared like its gallery; rebuild it with launch.py embed")
  try:
    return schema.PreprocessParams.from_dict(recorded, source)
  except ValueError as err:
    raise SearchError(str(err)) from None


def query_kind(text, keyword, volume):
  """("text" | "keyword" | "volume", the query) of the one query given."""
  given = [(k, v) for k, v in zip(QUERY_KINDS, (text, keyword, volume)) if v is not None]
  if len(given) != 1:
    raise SearchError("pass exactly one query: --text \"...\", --keyword K or --volume FILE")
  kind, value = given[0]
  if not str(value).strip():
    raise SearchError(f"--{kind}: empty query")
  return kind, value


def _check_keyword(keyword):
  try:
    findings.keyword_pattern(keyword)
  except ValueError as err:
    raise SearchError(f"--keyword: {err}") from None


def search_embedding(index, query, kind, top_k, excerpt_chars=200):
  """SearchResults of one query embedding: studies (text/keyword) or reports (volume), exact.

  A volume query ranks only the studies that have a report.
  """
  if kind != "volume":
    return index_lib.search(index, query, top_k, "image", excerpt_chars)
  if index.reports_count == 0:
    raise SearchError(f"{index.directory}: the index has no reports to rank (it was built "
                      f"from volumes without <name>.txt reports)")
  return index_lib.search(index, query, top_k, "text", excerpt_chars, only_with_report=True)


# Findings highlighted in the results of a sentence query (those it mentions), besides the
# config's eval.keywords.
HIGHLIGHT_FINDINGS = ("nodule", "mass", "consolidation", "pleural effusion", "effusion",
                      "atelectasis", "adenopathy", "emphysema", "cardiomegaly", "opacity",
                      "pneumothorax", "fibrosis", "bronchiectasis", "ground-glass opacity")


def query_findings(kind, value, config):
  """The findings whose mentions a result highlights: the keyword; the findings a sentence
  names; none for a volume."""
  if kind == "keyword":
    return [value]
  if kind != "text":
    return []
  vocabulary = dict.fromkeys([*config.eval.get("keywords", ()), *HIGHLIGHT_FINDINGS])
  return [f for f in vocabulary if findings.keyword_pattern(f).search(value.lower())]


def highlights(report, names):
  """[{"start", "end", "finding", "negated"}] of the mentions of `names` in `report` (offsets
  into the report; overlapping mentions keep the longer)."""
  spans = sorted(((s, e, n, neg) for n in names for s, e, neg in findings.mentions(report, n)),
                 key=lambda m: (m[0], -(m[1] - m[0])))
  kept, end = [], -1
  for start, stop, name, negated in spans:
    if start >= end:
      kept.append({"start": start, "end": stop, "finding": name, "negated": negated})
      end = stop
  return kept


def keyword_relevance(index, keyword):
  """(n,) bool relevance of every study's report to `keyword`, memoized per index (a server
  answers the same keyword many times; a scan of a million reports takes seconds)."""
  key = ("relevance", keyword.strip().lower())
  if key not in index.cache:
    if len(index.cache) > 64:
      index.cache.clear()
    index.cache[key] = findings.keyword_relevance(index.column("report"), keyword)
  return index.cache[key]


def _output(session, kind, value, results, method):
  index, loaded = session.index, session.loaded
  relevance = keyword_relevance(index, value) if kind == "keyword" else None
  names = query_findings(kind, value, session.config)
  rows = []
  for r in results:
    study = index.study(r.row)
    row = {"rank": r.rank, "study_id": r.study_id, "score": r.score, "excerpt": r.excerpt,
           "source_path": r.source_path, "report": study["report"],
           "has_thumbnail": study["has_thumbnail"],
           "highlights": highlights(study["report"], names)}
    if kind == "keyword":
      row["states_finding"] = bool(relevance[r.row])
    rows.append(row)
  out = {"query": {"type": kind, "value": value}, "index": os.path.abspath(index.directory),
         "n": index.n, "ranked": "reports" if kind == "volume" else "studies",
         "model": {k: loaded.identity.get(k) for k in ("checkpoint", "kind", "step", "backbone",
                                                     "fingerprint")},
         "search": method, "findings": names, "results": rows}
  if kind == "keyword":
    out["relevant_in_results"] = sum(row["states_finding"] for row in rows)
    out["relevant_in_index"] = int(relevance.sum())
  return out


def format_result(result):
  """The human-readable ranking of run's result."""
  query = result["query"]
  shown = (query["value"] if query["type"] == "volume"
           else repr(index_lib.excerpt(query["value"], 80)))
  lines = [f"{query['type']} query {shown}: top {len(result['results'])} of {result['n']} "
           f"{result['ranked']} (index {result['index']})"]
  keyword = query["type"] == "keyword"
  header = ["rank", "study_id", "score"] + (["finding"] if keyword else []) + ["report"]
  table = [header]
  for row in result["results"]:
    cells = [str(row["rank"]), row["study_id"], f"{row['score']:.4f}"]
    if keyword:
      cells.append("stated" if row["states_finding"] else "-")
    table.append(cells + [row["excerpt"]])
  widths = [max(len(r[c]) for r in table) for c in range(len(header) - 1)]
  for r in table:
    lines.append("  ".join(cell.rjust(w) if c in (0, 2) else cell.ljust(w)
                           for c, (cell, w) in enumerate(zip(r, widths))) + "  " + r[-1])
  if keyword:
    lines.append(f"{result['relevant_in_results']} of {len(result['results'])} results state "
                 f"{query['value']!r} ({result['relevant_in_index']} of {result['n']} studies "
                 f"in the index do)")
  return "\n".join(lines)
