"""`launch.py metrics`: the metrics of an embeddings.npz made by any system, offline on a CPU
-> metrics.json (next to the npz by default) and optional plots, and the table.

The same computation as `launch.py eval` (metrics.embedding_metrics) on the file's contents.
"""

import json
import os

from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib
from medfinder_jax.commands import eval as eval_command


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
  output_path = output_path or os.path.join(directory, eval_command.METRICS_FILE)
  if plots_dir is True:
    plots_dir = os.path.dirname(os.path.abspath(output_path))
  return result, eval_command.write_metrics(output_path, result, ranks, plots_dir or None,
                                            embeddings)


def format_result(metrics, show_chance=False, as_json=False):
  """The table (or the metrics as JSON)."""
  if as_json:
    return json.dumps(metrics, indent=2)
  return metrics_lib.format_metrics_table(metrics, show_chance=show_chance)
