#!/usr/bin/env python3
"""End-to-end search latency: query encoding + ranking over an index of --n studies (CPU).

In process (what a search service would pay per query, after start-up), per query kind:
  text / keyword   encode.texts (tokenize + text tower + projection, batch 1, padded to 16
                   tokens for these short queries instead of text.max_tokens = 100)
                   + commands/search.search_embedding over the image embeddings (top --top_k)
  volume           (--volume) preprocess.volume_from_file (NIfTI read + conversion
                   preprocessing) + image tower + ranking of the reports
Start-up costs are reported apart: index load, model load (+ fingerprint), first-query compile.
Then (--cli_runs > 0) the wall time of whole `launch.py search` commands (a new process each:
imports, model load, compile, one query), as a user typing the command sees it.

The index holds N random unit embeddings with phantom reports; the model is the default
architecture (ResNet-50 image tower, 512-d embeddings) with the text tower chosen by --text:
  minilm     the packaged all-MiniLM-L6-v2 (6 layers, 384 wide), real weights
  bert-base  a BERT-base-shaped tower (12 layers, 768 wide: BioBERT's size), random weights
Latency depends on the shapes, not on the weight values.

  python benchmarks/search_bench.py                        # N = 10k, MiniLM, 50 queries, 3 CLI runs
  python benchmarks/search_bench.py --text bert-base --cli_runs 0
  python benchmarks/search_bench.py --volume --shape 64,64,32   # volume queries at a small shape
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

QUERIES = ("right lower lobe atelectasis", "small left pleural effusion",
           "mediastinal adenopathy", "spiculated nodule in the right upper lobe",
           "patchy consolidation of the left lower lobe", "severe centrilobular emphysema")


def build_config(args):
  from medfinder_jax import config_utils  # pylint: disable=import-outside-toplevel
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "default.py"))
  config.text.model_path = "minilm"
  config.model.fusion.enabled = False       # a released-code file has none (loading.py)
  config.data.shape = tuple(int(s) for s in args.shape.split(","))
  config.data.spacing = ()
  return config


def build_model(config, text):
  """(model, variables): MedFinder with MiniLM's weights, or a BERT-base-shaped random tower."""
  import jax  # pylint: disable=import-outside-toplevel
  from medfinder_jax import loading  # pylint: disable=import-outside-toplevel
  from medfinder_jax.models import bert  # pylint: disable=import-outside-toplevel
  from medfinder_jax.models import medfinder  # pylint: disable=import-outside-toplevel
  if text == "minilm":
    return loading.init_model(config, config.data.shape, jax.random.key(0))
  model = loading.build_model(config, bert.BertConfig())
  return model, medfinder.initialize(model, jax.random.key(0), config.data.shape,
                                         config.text.max_tokens)


def phantom_reports(n, seed=0):
  from data_prep import phantom  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return [phantom.write_report(phantom.sample_findings(rng), rng) for _ in range(n)]


def write_files(directory, args):
  """A released-code model file and an N-study index of it; returns (config, model path, index)."""
  import jax  # pylint: disable=import-outside-toplevel
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax import loading  # pylint: disable=import-outside-toplevel
  from data_prep import schema  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import model_files  # pylint: disable=import-outside-toplevel
  config = build_config(args)
  model, variables = build_model(config, args.text)
  model_path = model_files.write_released_checkpoint(os.path.join(directory, "best_model.pt"),
                                                 jax.device_get(variables))
  if args.text == "bert-base":   # the tokenizer and BERT config.json come from this folder
    config.text.model_path = write_bert_base_folder(directory)
  spec = schema.DatasetSpec("", schema.PreprocessParams.from_config(config.data))
  loaded = loading.load_model(model_path, config, spec=spec)
  rng = np.random.default_rng(1)
  dim = config.model.embed_dim
  embeddings = {"image_embeddings": rng.standard_normal((args.n, dim), dtype=np.float32),
                "text_embeddings": rng.standard_normal((args.n, dim), dtype=np.float32),
                "study_ids": np.array([f"study-{i:06d}" for i in range(args.n)]),
                "reports": np.array(phantom_reports(args.n))}
  index = os.path.join(directory, "index")
  index_lib.build_index(index, embeddings, loaded.identity)
  return config, model_path, index


def write_bert_base_folder(directory):
  """MiniLM's tokenizer files with a BERT-base config.json (the weights come from the .pt)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from medfinder_jax import text as text_lib  # pylint: disable=import-outside-toplevel
  source = text_lib.resolve_text_model_path("minilm")
  folder = os.path.join(directory, "bert-base")
  os.makedirs(folder)
  for name in os.listdir(source):
    if name.startswith(("tokenizer", "vocab", "special_tokens", "model.safetensors")):
      shutil.copy(os.path.join(source, name), folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
               "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
              f)
  return folder


def timed(fn):
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start


def in_process(config, model_path, index_dir, args):
  """Per-query latency (ms) of query encoding + search, and the one-off costs (s)."""
  from medfinder_jax import encode  # pylint: disable=import-outside-toplevel
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax import sharding  # pylint: disable=import-outside-toplevel
  from medfinder_jax.commands import search  # pylint: disable=import-outside-toplevel
  index, load_index_s = timed(lambda: index_lib.load_index(index_dir))
  mesh = sharding.single_device_mesh()
  loaded, load_model_s = timed(lambda: search.load_index_model(index, config, model_path, mesh))
  variables = loaded.variables

  def text_query(text):
    query, encode_s = timed(lambda: encode.texts(loaded.model, variables, loaded.tokenizer,
                                                 [text], mesh, batch_size_per_device=1))
    results, search_s = timed(lambda: search.search_embedding(index, query[0], "text",
                                                              args.top_k))
    assert len(results) == args.top_k
    return encode_s, search_s

  _, first_s = timed(lambda: text_query(QUERIES[0]))
  samples = [text_query(QUERIES[i % len(QUERIES)] + f" ({i})") for i in range(args.queries)]
  out = {"n": index.n, "dim": index.dim, "top_k": args.top_k, "text": args.text,
         "queries": args.queries, "load_index_s": load_index_s, "load_model_s": load_model_s,
         "first_query_s": first_s, "text_query": summary(samples)}
  if args.volume:
    out["volume_query"] = volume_latency(loaded, variables, index, mesh, args)
  return out


def volume_latency(loaded, variables, index, mesh, args):
  """Volume query: read + preprocess a phantom NIfTI, image tower, rank reports."""
  from data_prep import phantom_layouts  # pylint: disable=import-outside-toplevel
  from data_prep import preprocess  # pylint: disable=import-outside-toplevel
  from medfinder_jax import encode  # pylint: disable=import-outside-toplevel
  from medfinder_jax.commands import search  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    phantom_layouts.write_phantom_corpus(tmp, n=1, seed=3, folders=1, size=256, slices=80)
    path = next(os.path.join(root, f) for root, _, files in os.walk(tmp) for f in files
                if f.endswith(".nii.gz"))
    params = loaded.preprocess

    def volume_query():
      volume, read_s = timed(lambda: preprocess.volume_from_file(path, params))
      query, encode_s = timed(lambda: encode.volumes(loaded.model, variables, volume[None],
                                                     params.intensity, mesh))
      _, search_s = timed(lambda: search.search_embedding(index, query[0], "volume",
                                                          args.top_k))
      return read_s, encode_s, search_s

    _, first_s = timed(volume_query)
    samples = [volume_query() for _ in range(max(1, args.queries // 10))]
  medians = [statistics.median(s[i] for s in samples) * 1e3 for i in range(3)]
  return {"shape": list(params.shape), "first_query_s": first_s, "read_preprocess_ms": medians[0],
          "encode_ms": medians[1], "search_ms": medians[2], "total_ms": sum(medians),
          "queries": len(samples)}


def summary(samples):
  """Median / p95 in ms of (encode, search) pairs and of their sums."""
  encode = [s[0] * 1e3 for s in samples]
  search = [s[1] * 1e3 for s in samples]
  total = [a + b for a, b in zip(encode, search)]
  p95 = lambda v: float(np.percentile(v, 95))
  return {"encode_ms": statistics.median(encode), "search_ms": statistics.median(search),
          "total_ms": statistics.median(total), "total_p95_ms": p95(total)}


def cli_runs(config, model_path, index_dir, runs):
  """Wall seconds of whole `launch.py search` processes (one text query each)."""
  argv = [sys.executable, os.path.join(ROOT, "launch.py"), "search", "--index", index_dir,
          "--text", QUERIES[1], "--json", "--config.text.model_path=" + config.text.model_path,
          "--config.model.fusion.enabled=false"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  walls = []
  for _ in range(runs):
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    walls.append(time.perf_counter() - start)
    if done.returncode != 0:
      raise RuntimeError(f"launch.py search failed:\n{done.stderr[-2000:]}")
  return {"runs": runs, "median_s": statistics.median(walls), "min_s": min(walls)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=10_000, help="studies in the index")
  parser.add_argument("--queries", type=int, default=50, help="timed queries (after one warm-up)")
  parser.add_argument("--top_k", type=int, default=10)
  parser.add_argument("--text", choices=("minilm", "bert-base"), default="minilm")
  parser.add_argument("--shape", default="224,224,96", help="X,Y,Z volume shape of the model")
  parser.add_argument("--volume", action="store_true", help="also time volume queries")
  parser.add_argument("--cli_runs", type=int, default=3, help="whole `launch.py search` runs")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    config, model_path, index = write_files(tmp, args)
    result = in_process(config, model_path, index, args)
    if args.cli_runs:
      result["cli"] = cli_runs(config, model_path, index, args.cli_runs)
  result["device"] = str(jax.devices()[0].device_kind)
  result["cpus"] = os.cpu_count()
  report(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


def report(r):
  t = r["text_query"]
  print(f"index: {r['n']} studies, D={r['dim']}, top {r['top_k']}; text tower {r['text']}; "
        f"{r['device']} x{r['cpus']} CPUs")
  print(f"one-off: index load {r['load_index_s']:.2f} s, model load + fingerprint "
        f"{r['load_model_s']:.2f} s, first query (compile) {r['first_query_s']:.2f} s")
  print(f"text/keyword query ({r['queries']} queries): encode {t['encode_ms']:.1f} ms + search "
        f"{t['search_ms']:.2f} ms = {t['total_ms']:.1f} ms median (p95 {t['total_p95_ms']:.1f} ms)")
  if "volume_query" in r:
    v = r["volume_query"]
    print(f"volume query at {v['shape']} ({v['queries']} queries): read + preprocess "
          f"{v['read_preprocess_ms']:.0f} ms + encode {v['encode_ms']:.0f} ms + search "
          f"{v['search_ms']:.2f} ms = {v['total_ms']:.0f} ms median "
          f"(first {v['first_query_s']:.1f} s)")
  if "cli" in r:
    print(f"`launch.py search --text ...` whole command: {r['cli']['median_s']:.1f} s median of "
          f"{r['cli']['runs']} runs (min {r['cli']['min_s']:.1f} s)")


if __name__ == "__main__":
  main()
