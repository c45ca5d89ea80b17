"""`launch.py search`: ranked studies for a text or keyword query, ranked reports for a volume.

The query is encoded by the model recorded in the index (--model_path when it moved), which
must be the one that built it (same fingerprint: loading.identity_differences); a volume query
is preprocessed like the index's gallery volumes (the preprocessing the index records). The
result is a plain dict (the --json output), and `format_result` is its table.
"""

import os

from data_prep import preprocess
from data_prep import schema
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
        model_path=None):
  """The ranking of one query (see the module docstring); a user error for a bad query, index
  or model."""
  kind, value = query_kind(text, keyword, volume)
  top_k = int(config.eval.search_top_k if top_k is None else top_k)
  if top_k < 1:
    raise SearchError(f"--top_k must be at least 1, got {top_k}")
  if kind == "keyword":
    _check_keyword(value)
  index = index_lib.load_index(index_dir)
  if kind == "volume":   # read before the model loads: a bad file fails fast
    params = index_preprocessing(index)
    stored = preprocess.volume_from_file(value, params, config.data.get("max_volume_mib"))
  mesh = sharding.single_device_mesh()
  loaded = load_index_model(index, config, model_path, mesh)
  if kind == "volume":
    query = encode.volumes(loaded.model, loaded.variables, stored[None], params.intensity, mesh)
  else:
    query = encode.texts(loaded.model, loaded.variables, loaded.tokenizer, [value], mesh,
                         batch_size_per_device=1)
  results = search_embedding(index, query[0], kind, top_k, config.eval.excerpt_chars)
  return _output(index, kind, value, results, loaded)


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
  """SearchResults of one query embedding: studies (text/keyword) or reports (volume).

  A volume query ranks only the studies that have a report.
  """
  if kind != "volume":
    return index_lib.search(index, query, top_k, "image", excerpt_chars)
  has_report = [bool(r) for r in index.reports]
  if not any(has_report):
    raise SearchError(f"{index.directory}: the index has no reports to rank (it was built "
                      f"from volumes without <name>.txt reports)")
  limit = top_k + has_report.count(False)
  ranked = [r for r in index_lib.search(index, query, limit, "text", excerpt_chars)
            if has_report[r.row]][:top_k]
  return [r._replace(rank=i + 1) for i, r in enumerate(ranked)]


def _output(index, kind, value, results, loaded):
  relevance = findings.keyword_relevance(index.reports, value) if kind == "keyword" else None
  rows = []
  for r in results:
    row = {"rank": r.rank, "study_id": r.study_id, "score": r.score, "excerpt": r.excerpt,
           "source_path": r.source_path, "report": str(index.reports[r.row])}
    if kind == "keyword":
      row["states_finding"] = bool(relevance[r.row])
    rows.append(row)
  out = {"query": {"type": kind, "value": value}, "index": os.path.abspath(index.directory),
         "n": index.n, "ranked": "reports" if kind == "volume" else "studies",
         "model": {k: loaded.identity.get(k) for k in ("checkpoint", "kind", "step", "backbone",
                                                     "fingerprint")},
         "results": rows}
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
