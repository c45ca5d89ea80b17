"""`launch.py metrics`: the metrics of an embeddings.npz made by any system, offline on a CPU
-> metrics.json (next to the npz by default) and optional plots, and the table.

The same computation as `launch.py eval` (metrics.embedding_metrics) on the file's contents;
`write_metrics` is also how eval writes its files. Nothing here imports the input pipeline
(TensorFlow), and on a machine without an accelerator the ranks are counted on the host
(metrics.rank_engine), so JAX is not imported either.
"""

import json
import os

from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib


METRICS_FILE = "metrics.json"


def run(config, embeddings_path, *, output_path=None, output_dir=None, plots_dir=None,
        bootstrap_samples=None):
  """Returns (metrics, written paths). A user error for unusable input or unwritable outputs.

  metrics.json goes to `output_path`, else into `output_dir`, else next to the npz; plots go to
  `plots_dir`, else (when asked for with plots_dir=True) next to metrics.json.
  """
  settings = metrics_lib.MetricSettings.from_config(config.eval, config.seed, bootstrap_samples)
  embeddings = interchange.load_embeddings(embeddings_path)
  result, ranks = metrics_lib.embedding_metrics(embeddings, settings)
  result["embeddings"] = os.path.abspath(embeddings_path)
  directory = output_dir or os.path.dirname(os.path.abspath(embeddings_path))
  output_path = output_path or os.path.join(directory, METRICS_FILE)
  if plots_dir is True:
    plots_dir = os.path.dirname(os.path.abspath(output_path))
  return result, write_metrics(output_path, result, ranks, plots_dir or None,
                                            embeddings)


def format_result(metrics, show_chance=False, as_json=False):
  """The table (or the metrics as JSON)."""
  if as_json:
    return json.dumps(metrics, indent=2)
  return metrics_lib.format_metrics_table(metrics, show_chance=show_chance)


def write_metrics(path, metrics, ranks, plots_dir=None, embeddings=None):
  """metrics.json at `path` and, with `plots_dir`, rank_histogram.png and recall_at_k.png (+ one
  ROC curve per zero-shot label when `embeddings` carry labels and prompts)."""
  written = [checked_write(path, lambda: interchange.write_metrics_json(path, metrics))]
  if plots_dir:
    from medfinder_jax import plots   # matplotlib only when plots are asked for
    written += checked_write(plots_dir, lambda: plots.save_retrieval_plots(ranks, plots_dir))
    section = metrics.get("zeroshot") or {}
    if embeddings is not None and section.get("labels"):
      if metrics.get("gallery", {}).get("unit") == "scan":
        embeddings = metrics_lib.scan_gallery(embeddings)
      written += checked_write(plots_dir, lambda: plots.save_roc_plots(
          metrics_lib.zeroshot_scores(embeddings), embeddings.labels, section, plots_dir))
  return written


def checked_write(path, write):
  """write()'s result; an OSError becomes an InterchangeError naming `path`."""
  try:
    return write()
  except OSError as err:
    raise interchange.InterchangeError(f"{path}: cannot write ({err.strerror or err})") from None
