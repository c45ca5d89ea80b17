#!/usr/bin/env python3
"""Retrieval-metric cost: our chunked rank counting vs the released code's argsort, and search.

For each N, both directions (t2i, i2t) of R@1/5/10, MdR, MnR from N paired D-dim embeddings:
- ours:     medfinder_jax.metrics.paired_ranks + metrics_from_ranks (chunked, never N×N), 1 device;
- released: a numpy reimplementation of main_ddp.py's validate/compute_metrics: the full N×N
            similarity S = T·Iᵀ, a full argsort of every row of S and of Sᵀ, then the rank of the
            paired item found row by row (as its loop does). Its peak memory is about 12·N² bytes
            (S in float32 + argsort indices in int64), so N above --reference_max_n is skipped and
            its time and memory are extrapolated (time ∝ N² log N from the largest measured N).
Each measurement runs in a fresh process, so the peak RSS is that case's own; where both ran, the
largest difference between their 10 metrics is printed. Then the cost of bootstrap CIs at the
largest N, and search latency (text query -> top 10 studies) over an index of --index_n studies
(--parts picks which of metrics / bootstrap / search run).

  python benchmarks/metrics_bench.py                      # N = 1k, 8k, 32k, 100k; D = 512
  python benchmarks/metrics_bench.py --ns 1000 8000 --dim 512 --reference_max_n 16384
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_pairs(n, dim, seed=0):
  """Paired embeddings with realistic (non-trivial) ranks."""
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((n, dim), dtype=np.float32)
  text = image + 2.0 * rng.standard_normal((n, dim), dtype=np.float32)
  return text, image


def rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- The released code's metrics, reimplemented in numpy -----------------------------------------

def released_compute_metrics(similarities):
  """main_ddp.py compute_metrics: full argsort of each row (descending), rank found per row."""
  n = similarities.shape[0]
  sorted_indices = np.argsort(similarities, axis=1)[:, ::-1]   # torch.argsort(descending=True)
  gt = np.arange(n)
  result = {}
  for k in (1, 5, 10):
    result[f"R@{k}"] = float((sorted_indices[:, :k] == gt[:, None]).any(axis=1).mean() * 100)
  ranks = np.array([np.flatnonzero(sorted_indices[i] == i)[0] + 1 for i in range(n)])
  result["MdR"] = float(np.median(ranks))
  result["MnR"] = float(np.mean(ranks))
  return result


def released_validate(text, image):
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  similarities = text @ image.T
  return {"t2i": released_compute_metrics(similarities),
          "i2t": released_compute_metrics(similarities.T)}


def ours(text, image):
  from medfinder_jax import metrics
  result = metrics.metrics_from_ranks(metrics.paired_ranks(text, image))
  return {d: result[d] for d in ("t2i", "i2t")}


# --- One measurement per process -----------------------------------------------------------------

def run_case(method, n, dim, repeats):
  text, image = make_pairs(n, dim)
  if method == "ours":
    import jax  # noqa: F401  (runtime loaded before the baseline is taken)
  fn = ours if method == "ours" else released_validate
  baseline = rss_mib()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn(text, image)
    times.append(time.perf_counter() - start)
  return {"method": method, "n": n, "dim": dim, "seconds": min(times), "first_call_s": times[0],
          "peak_rss_mib": peak_rss_mib(), "inputs_rss_mib": baseline,
          "extra_peak_mib": peak_rss_mib() - baseline, "metrics": result}


def measure(method, n, dim, repeats):
  command = [sys.executable, os.path.abspath(__file__), "--case", method, "--ns", str(n),
             "--dim", str(dim), "--repeats", str(repeats)]
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def search_latency(n, dim, queries=200, top_k=10):
  from medfinder_jax import index as index_lib
  from medfinder_jax import interchange
  text, image = make_pairs(n, dim, seed=1)
  fields = {"image_embeddings": image, "text_embeddings": text,
            "study_ids": np.array([f"s{i}" for i in range(n)]),
            "reports": np.array([f"report {i} " * 30 for i in range(n)]),
            "source_paths": np.array([f"CT{i % 10}/ct/s{i}.nii.gz" for i in range(n)])}
  model = {"backbone": "bench", "embed_dim": dim, "fingerprint": "bench"}
  with tempfile.TemporaryDirectory() as tmp:
    path = index_lib.build_index(os.path.join(tmp, "index"), interchange.validate(fields), model)
    start = time.perf_counter()
    index = index_lib.load_index(path)
    load_s = time.perf_counter() - start
  rows = np.random.default_rng(2).integers(0, n, size=queries)
  latencies, hits = [], 0
  for row in rows:
    start = time.perf_counter()
    results = index_lib.search(index, text[row], top_k=top_k, against="image")
    latencies.append(time.perf_counter() - start)
    hits += results[0].row == row
  ms = 1000 * np.array(latencies)
  return {"n": n, "dim": dim, "queries": queries, "top_k": top_k, "load_s": load_s,
          "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
          "self_at_rank_1": int(hits)}


def bootstrap_cost(n, samples):
  """Seconds for percentile CIs of all 10 rank metrics (both directions) at N, B resamples."""
  from medfinder_jax import metrics
  rng = np.random.default_rng(3)
  ranks = {d: np.minimum(rng.geometric(0.001, size=n), n) for d in ("t2i", "i2t")}
  start = time.perf_counter()
  metrics.bootstrap_rank_intervals(ranks, num_samples=samples)
  return {"n": n, "samples": samples, "seconds": time.perf_counter() - start}


# --- Report --------------------------------------------------------------------------------------

def extrapolate(measured, n):
  """Released-code cost at n from the largest measured n: time ∝ N² log N, memory 12·N² bytes."""
  scale = (n / measured["n"]) ** 2 * np.log(n) / np.log(measured["n"])
  return {"method": "released", "n": n, "seconds": measured["seconds"] * scale,
          "extra_peak_mib": 12 * n * n / 2**20, "extrapolated": True}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ns", type=int, nargs="+", default=[1000, 8000, 32000, 100000])
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--reference_max_n", type=int, default=16384,
                      help="largest N for the released argsort (needs ~12·N² bytes)")
  parser.add_argument("--index_n", type=int, default=10000)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per case (best kept; default 2 up to N=8k, else 1)")
  parser.add_argument("--bootstrap_samples", type=int, default=1000)
  parser.add_argument("--parts", nargs="+", default=["metrics", "bootstrap", "search"],
                      choices=["metrics", "bootstrap", "search"])
  parser.add_argument("--json_out", default=None)
  parser.add_argument("--case", choices=["ours", "released"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    print(json.dumps(run_case(args.case, args.ns[0], args.dim, args.repeats or 1)))
    return

  rows, last_released, search, bootstrap = [], None, None, None
  for n in (args.ns if "metrics" in args.parts else []):
    repeats = args.repeats or (2 if n <= 8192 else 1)
    mine = measure("ours", n, args.dim, repeats)
    if n <= args.reference_max_n:
      theirs = last_released = measure("released", n, args.dim, repeats)
      # Equal up to float32 matmul rounding (a near-tie may flip: MnR by 1/N, R@K by 100/N).
      mine["max_metric_diff"] = max(abs(mine["metrics"][d][m] - theirs["metrics"][d][m])
                                    for d in ("t2i", "i2t") for m in theirs["metrics"][d])
    else:
      theirs = extrapolate(last_released, n) if last_released else None
    rows.append({"n": n, "ours": mine, "released": theirs})
    print(f"N={n}: ours {mine['seconds']:.2f}s {mine['extra_peak_mib']:.0f} MiB "
          f"(max |ours - released| over the 10 metrics: {mine.get('max_metric_diff', 'n/a')}); "
          "released "
          + (f"{theirs['seconds']:.2f}s {theirs['extra_peak_mib']:.0f} MiB"
             + (" (extrapolated)" if theirs.get("extrapolated") else "") if theirs else "n/a"),
          flush=True)
  if "bootstrap" in args.parts:
    bootstrap = bootstrap_cost(max(args.ns), args.bootstrap_samples)
  if "search" in args.parts:
    search = search_latency(args.index_n, args.dim)
  report(args, rows, search, bootstrap)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"rows": rows, "search": search, "bootstrap": bootstrap}, f, indent=2)


def print_metric_table(args, rows):
  print(f"\nD = {args.dim}, both directions, {os.cpu_count()} CPU cores; "
        "time = best of repeats (first call incl. compile in parentheses); "
        "memory = peak RSS above the inputs")
  print("| N | ours time | ours memory | released time | released memory | time ratio "
        "(released/ours) | memory ratio |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    mine, theirs = row["ours"], row["released"]
    mark = " (extrapolated)" if theirs and theirs.get("extrapolated") else ""
    their_cells = (f"{theirs['seconds']:.2f} s{mark} | {theirs['extra_peak_mib']:.0f} MiB{mark} | "
                   f"{theirs['seconds'] / mine['seconds']:.1f}x | "
                   f"{theirs['extra_peak_mib'] / max(mine['extra_peak_mib'], 1):.1f}x"
                   if theirs else "n/a | n/a | n/a | n/a")
    print(f"| {row['n']} | {mine['seconds']:.2f} s ({mine['first_call_s']:.2f}) | "
          f"{mine['extra_peak_mib']:.0f} MiB | {their_cells} |")


def report(args, rows, search, bootstrap):
  if rows:
    print_metric_table(args, rows)
  if bootstrap:
    print(f"\nbootstrap CIs (10 metrics, {bootstrap['samples']} resamples) at N={bootstrap['n']}: "
          f"{bootstrap['seconds']:.2f} s")
  if search:
    print(f"\nsearch over {search['n']} studies (D={search['dim']}, top {search['top_k']}): "
          f"median {search['median_ms']:.2f} ms, p95 {search['p95_ms']:.2f} ms per query "
          f"({search['queries']} queries; own study at rank 1 for {search['self_at_rank_1']}); "
          f"index load {search['load_s']:.2f} s")


if __name__ == "__main__":
  main()
