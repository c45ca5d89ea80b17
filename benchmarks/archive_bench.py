#!/usr/bin/env python3
"""Archive search at scale: build, size, ANN, search latency, `serve` RSS and HTTP throughput.

Synthetic studies (D = --dim, default 512): image embeddings drawn around --clusters centres
(real embeddings cluster by anatomy and finding; uniform random vectors have no neighbours
worth finding and would make any ANN index look worse than it is on real data), report
embeddings near their own image; reports cycled from 500 phantom reports. The index is written
by index_lib.add_studies in shards of --shard_rows (as --append runs would), recorded as made by
the default architecture (ResNet-50 + MiniLM, 512-d) saved as a released-code file, so
`launch.py serve` can load it.

Phases (--phases, comma-separated):
  build   index build time and size on disk (--n studies)
  ann     `index-ann` (IVF-SQ8) build time, nprobe and recall@10 against exact search
  search  in a fresh process: p50/p99 of single queries and of batches of 64, exact and ANN
          (ranking only: the query embeddings are report embeddings of random studies + noise)
  serve   RSS of a `launch.py serve` process over the index after exact and ANN queries
  http    a --http_n-study index under `launch.py serve`: text queries through HTTP from
          --clients concurrent clients for --http_seconds: req/s and latency; and, in process,
          the share of a query spent encoding its text (Session.encode_texts vs the whole answer)

  python benchmarks/archive_bench.py --n 1000000 --dir /tmp/archive_bench     # everything
  python benchmarks/archive_bench.py --n 20000 --http_n 5000 --http_seconds 5  # a quick look
The index directory is kept (--dir) so phases can be rerun; --keep false removes it at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

QUERIES = ("right lower lobe atelectasis", "small left pleural effusion",
           "mediastinal adenopathy", "spiculated nodule in the right upper lobe",
           "patchy consolidation of the left lower lobe", "severe centrilobular emphysema")


def du_mib(path):
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 2**20


def model_files(directory):
  """(config, model path, identity) of the default architecture saved as a released-code file."""
  import jax  # pylint: disable=import-outside-toplevel
  import search_bench  # pylint: disable=import-outside-toplevel
  from data_prep import schema  # pylint: disable=import-outside-toplevel
  from medfinder_jax import loading  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import model_files as files  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(shape="224,224,96", text="minilm")
  config = search_bench.build_config(args)
  path = os.path.join(directory, "best_model.pt")
  if not os.path.exists(path):
    _, variables = search_bench.build_model(config, "minilm")
    files.write_released_checkpoint(path, jax.device_get(variables))
  spec = schema.DatasetSpec("", schema.PreprocessParams.from_config(config.data))
  loaded = loading.load_model(path, config, spec=spec)
  return config, path, loaded.identity


def synthetic_chunk(first, rows, dim, clusters, rng, reports, spread=0.5):
  centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32)
  image = centres[rng.integers(0, clusters, rows)]
  image += spread * rng.standard_normal((rows, dim), dtype=np.float32)
  text = image + 0.3 * rng.standard_normal((rows, dim), dtype=np.float32)
  from medfinder_jax import interchange  # pylint: disable=import-outside-toplevel
  return interchange.EmbeddingSet(
      image_embeddings=image, text_embeddings=text,
      study_ids=np.array([f"study-{first + i:07d}" for i in range(rows)]),
      reports=np.array([reports[(first + i) % len(reports)] for i in range(rows)]),
      source_paths=np.array([f"CT{(first + i) % 10}/ct/study-{first + i:07d}.nii.gz"
                             for i in range(rows)]))


def build(index_dir, n, args, identity):
  import search_bench  # pylint: disable=import-outside-toplevel
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  if os.path.exists(index_dir):
    shutil.rmtree(index_dir)
  reports = search_bench.phantom_reports(500)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  index_lib.open_or_create(index_dir, args.dim, identity, args.dtype)
  for first in range(0, n, args.shard_rows):
    rows = min(args.shard_rows, n - first)
    index_lib.add_studies(index_dir, synthetic_chunk(first, rows, args.dim, args.clusters, rng,
                                                     reports, args.spread))
  seconds = time.perf_counter() - start
  return {"n": n, "dim": args.dim, "dtype": args.dtype, "shards": -(-n // args.shard_rows),
          "build_s": round(seconds, 1), "size_mib": round(du_mib(index_dir), 1)}


def build_ann(index_dir):
  from medfinder_jax import ann as ann_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  meta = ann_lib.build(index_lib.load_index(index_dir), queries=1000, log=lambda line: None)
  return {"ann_build_s": round(time.perf_counter() - start, 1), "kind": meta["kind"],
          "nprobe": meta["nprobe"], "recall_at_10": meta["recall_at_10"],
          "recall_by_nprobe": meta["recall_by_nprobe"],
          "ann_size_mib": round(du_mib(os.path.join(index_dir, ann_lib.ANN_DIR)), 1)}


def percentiles(seconds):
  ms = 1e3 * np.asarray(seconds)
  return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
          "p99_ms": round(float(np.percentile(ms, 99)), 2), "runs": len(ms)}


def search_latency(index_dir, args):
  """Runs in its own process (--case search): single and batched, exact and ANN."""
  from medfinder_jax import ann as ann_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  index = index_lib.load_index(index_dir)
  ann, why = ann_lib.load(index)
  out = {"load_s": round(time.perf_counter() - start, 2), "n": index.n}
  rng = np.random.default_rng(7)
  rows = rng.choice(index.n, size=max(args.single_queries, 64 * args.batches), replace=False)
  queries = index_lib.query_vectors(index, index.vectors(np.sort(rows), "text"))
  queries = index_lib.query_vectors(index, queries + 0.05 * rng.standard_normal(
      queries.shape, dtype=np.float32))
  methods = {"exact": lambda q: index_lib.exact_top_k(index, q, 10)}
  if ann is not None:
    methods["ann"] = lambda q: ann.search(index, q, 10)
  else:
    out["ann"] = why
  for name, method in methods.items():
    method(queries[:1])
    single = []
    count = args.single_queries if name == "ann" else args.exact_queries
    for q in queries[:count]:
      begin = time.perf_counter()
      method(q[None])
      single.append(time.perf_counter() - begin)
    batches = []
    for b in range(args.batches):
      begin = time.perf_counter()
      method(queries[64 * b:64 * (b + 1)])
      batches.append(time.perf_counter() - begin)
    out[name] = {"single": percentiles(single), "batch64": percentiles(batches),
                 "batch64_per_query_ms": round(1e3 * statistics.median(batches) / 64, 2)}
  out["rss_mib"] = round(rss_mib("self"), 0)
  return out


def rss_mib(pid):
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["VmRSS"].split()[0]) / 1024


def rss_split_mib(pid):
  """(anonymous, file-backed) resident MiB: mapped index pages are file-backed page cache."""
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return (round(int(fields["RssAnon"].split()[0]) / 1024),
          round(int(fields["RssFile"].split()[0]) / 1024))


def hwm_mib(pid):
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["VmHWM"].split()[0]) / 1024


def start_server(index_dir, config, port):
  argv = [sys.executable, os.path.join(ROOT, "launch.py"), "serve", "--index", index_dir,
          "--port", str(port), "--config.text.model_path=" + config.text.model_path,
          "--config.model.fusion.enabled=false"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  log = tempfile.TemporaryFile()
  process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
  base = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while time.time() < deadline:
    if process.poll() is not None:
      log.seek(0)
      raise RuntimeError(f"serve exited:\n{log.read().decode()[-3000:]}")
    try:
      urllib.request.urlopen(base + "/api/info", timeout=5).read()
      return process, base
    except OSError:
      time.sleep(1)
  process.kill()
  raise RuntimeError("serve did not start")


def get(base, **params):
  url = base + "/api/search?" + urllib.parse.urlencode(params)
  with urllib.request.urlopen(url, timeout=120) as answer:
    return json.loads(answer.read())


def serve_rss(index_dir, config, args):
  process, base = start_server(index_dir, config, args.port)
  try:
    started = rss_mib(process.pid)
    get(base, text=QUERIES[0])
    for i in range(20):
      get(base, text=QUERIES[i % len(QUERIES)] + f" {i}")
    after_ann = rss_mib(process.pid)
    ann_split = rss_split_mib(process.pid)
    for i in range(5):
      get(base, text=QUERIES[i % len(QUERIES)], exact="1")
    return {"rss_started_mib": round(started), "rss_after_ann_queries_mib": round(after_ann),
            "rss_after_exact_queries_mib": round(rss_mib(process.pid)),
            "anon_file_after_ann_mib": ann_split,
            "anon_file_after_exact_mib": rss_split_mib(process.pid),
            "peak_rss_mib": round(hwm_mib(process.pid)),
            "method": get(base, text=QUERIES[0])["search"]["method"]}
  finally:
    process.terminate()
    process.wait(30)


def http_throughput(index_dir, config, args):
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  process, base = start_server(index_dir, config, args.port + 1)
  try:
    for q in QUERIES:
      get(base, text=q)

    def client(c):
      latencies, i = [], 0
      stop = time.perf_counter() + args.http_seconds
      while time.perf_counter() < stop:
        begin = time.perf_counter()
        get(base, text=f"{QUERIES[(c + i) % len(QUERIES)]} {c}-{i}")
        latencies.append(time.perf_counter() - begin)
        i += 1
      return latencies

    begin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
      latencies = sum(pool.map(client, range(args.clients)), [])
    wall = time.perf_counter() - begin
    method = get(base, text=QUERIES[0])["search"]["method"]
  finally:
    process.terminate()
    process.wait(30)
  return {"n": args.http_n, "clients": args.clients, "requests": len(latencies),
          "req_per_s": round(len(latencies) / wall, 1), **percentiles(latencies),
          "method": method, **encode_share(index_dir, config, args)}


def encode_share(index_dir, config, args):
  """In process, with the server's Session: encoding vs the whole answer of a text query."""
  from medfinder_jax import index as index_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax.commands import search  # pylint: disable=import-outside-toplevel
  session = search.Session(config, index_lib.load_index(index_dir))
  session.answer("text", QUERIES[0], 10)
  encode, total = [], []
  for i in range(args.share_queries):
    text = f"{QUERIES[i % len(QUERIES)]} {i}"
    begin = time.perf_counter()
    session.encode_texts([text])
    encode.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    session.answer("text", text, 10)
    total.append(time.perf_counter() - begin)
  return {"encode_ms": round(1e3 * statistics.median(encode), 2),
          "answer_ms": round(1e3 * statistics.median(total), 2),
          "encode_share": round(statistics.median(encode) / statistics.median(total), 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--dtype", default="float16")
  parser.add_argument("--clusters", type=int, default=2000)
  parser.add_argument("--shard_rows", type=int, default=100_000)
  parser.add_argument("--spread", type=float, default=0.5,
                      help="within-cluster noise per dimension (centres are unit normal); "
                           "larger = clusters overlap = harder for ANN")
  parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "archive_bench"))
  parser.add_argument("--phases", default="build,ann,search,serve,http")
  parser.add_argument("--single_queries", type=int, default=200)
  parser.add_argument("--exact_queries", type=int, default=30)
  parser.add_argument("--batches", type=int, default=5)
  parser.add_argument("--http_n", type=int, default=100_000)
  parser.add_argument("--http_seconds", type=float, default=20)
  parser.add_argument("--clients", type=int, default=4)
  parser.add_argument("--share_queries", type=int, default=30)
  parser.add_argument("--port", type=int, default=8391)
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--json", default=None, help="also write the results to this file")
  parser.add_argument("--keep", default="true")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  index_dir = os.path.join(args.dir, "index")
  if args.case == "search":
    print(json.dumps(search_latency(index_dir, args)))
    return
  os.makedirs(args.dir, exist_ok=True)
  phases = args.phases.split(",")
  config, _, identity = model_files(args.dir)
  result = {"cpus": os.cpu_count()}
  if "build" in phases:
    result["build"] = build(index_dir, args.n, args, identity)
    print("build", result["build"], flush=True)
  if "ann" in phases:
    result["ann"] = build_ann(index_dir)
    print("ann", result["ann"], flush=True)
  if "search" in phases:
    command = [sys.executable, os.path.abspath(__file__), "--case", "search", "--dir", args.dir,
               "--single_queries", str(args.single_queries), "--exact_queries",
               str(args.exact_queries), "--batches", str(args.batches)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result["search"] = json.loads(output.strip().splitlines()[-1])
    print("search", result["search"], flush=True)
  if "serve" in phases:
    result["serve"] = serve_rss(index_dir, config, args)
    print("serve", result["serve"], flush=True)
  if "http" in phases:
    small = os.path.join(args.dir, "index_http")
    build(small, args.http_n, args, identity)
    build_ann(small)
    result["http"] = http_throughput(small, config, args)
    print("http", result["http"], flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  if args.keep == "false":
    shutil.rmtree(args.dir)


if __name__ == "__main__":
  main()
