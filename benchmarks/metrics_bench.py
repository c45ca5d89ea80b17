#!/usr/bin/env python3
"""Metric cost at the machine's limit: one-pass retrieval beside a plain GEMM, the released
code's argsort, the bootstrap, zero-shot classification and `launch.py metrics` end to end.

For each N, both directions (t2i, i2t) of R@1/5/10, MdR, MnR from N paired D-dim embeddings:
- ours:     medfinder_jax.metrics.paired_ranks + metrics_from_ranks (one pass over S in tiles,
            never N×N) with the host engine (score_pass_host: the BLAS numpy links, one thread
            per core; what `auto` picks on a CPU); beside it, in the same process, a plain
            chunked fp32 GEMM of the same N×N×D multiply-adds by that BLAS with all its threads
            (each chunk's scores summed, so nothing is skipped): the ratio ours / GEMM is what
            the rank counting costs beyond the matmul itself;
- ours_jax: the same with the JAX engine (score_pass, 1 device: what meshes and accelerators
            use), beside a plain chunked GEMM in XLA;
- released: a numpy reimplementation of main_ddp.py's validate/compute_metrics: the full N×N
            similarity S = T·Iᵀ, a full argsort of every row of S and of Sᵀ, then the rank of the
            paired item found row by row (as its loop does). Its peak memory is about 12·N² bytes
            (S in float32 + argsort indices in int64), so N above --reference_max_n is skipped and
            its time and memory are extrapolated (time ∝ N² log N from the largest measured N).
Each measurement runs in a fresh process, so the peak RSS is that case's own; where both ran, the
largest difference between their 10 metrics is printed. Then: bootstrap CIs of the 10 rank
metrics at the largest N, zero-shot classification (18 labels, AUROC/AUPRC/F1 with bootstrap CIs)
at the largest N, and `launch.py metrics` end to end (process start-up included) on an npz of
--cli_n pairs (--parts picks which run).

  python benchmarks/metrics_bench.py                      # N = 1k, 8k, 32k, 100k; D = 512
  python benchmarks/metrics_bench.py --ns 8192 --parts metrics cli
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


def ours(text, image, engine="host"):
  from medfinder_jax import metrics
  result = metrics.metrics_from_ranks(metrics.paired_ranks(text, image, engine=engine))
  return {d: result[d] for d in ("t2i", "i2t")}


def plain_gemm_blas(text, image):
  """The same N×N×D multiply-adds as one pass by numpy's BLAS (all its threads), in chunks of
  the default tile's rows, fp32, each chunk's row sums kept."""
  from medfinder_jax import score_pass_host
  n = text.shape[0]
  rows = score_pass_host.default_block_size(n)
  out = np.empty((rows, n), np.float32)
  sums = []
  for start in range(0, n, rows):
    chunk = text[start:start + rows]
    np.matmul(chunk, image.T, out=out[:len(chunk)])
    sums.append(out[:len(chunk)].sum(axis=1))
  return np.concatenate(sums)


def plain_gemm_xla(text, image):
  """The same N×N×D multiply-adds as one pass in XLA, in chunks of the default tile's rows, fp32."""
  import jax
  import jax.numpy as jnp
  from medfinder_jax import score_pass_host
  n = text.shape[0]
  rows = score_pass_host.default_block_size(n)
  blocks = -(-n // rows)

  @jax.jit
  def run(text, image):
    chunks = jnp.pad(text, ((0, blocks * rows - n), (0, 0))).reshape(blocks, rows, -1)
    return jax.lax.map(lambda c: jnp.sum(jnp.matmul(c, image.T, precision="highest"), axis=1),
                       chunks)

  return jax.block_until_ready(run(jnp.asarray(text), jnp.asarray(image)))


# --- One measurement per process -----------------------------------------------------------------

def run_case(method, n, dim, repeats):
  text, image = make_pairs(n, dim)
  if method == "ours":   # runtimes loaded before the baseline is taken
    from medfinder_jax import score_pass_host  # noqa: F401
    fn, gemm_fn = ours, plain_gemm_blas
  elif method == "ours_jax":
    from medfinder_jax import score_pass  # noqa: F401
    fn, gemm_fn = (lambda t, i: ours(t, i, engine="jax")), plain_gemm_xla
  else:
    fn, gemm_fn = released_validate, None
  baseline = rss_mib()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn(text, image)
    times.append(time.perf_counter() - start)
  out = {"method": method, "n": n, "dim": dim, "seconds": min(times), "first_call_s": times[0],
         "peak_rss_mib": peak_rss_mib(), "inputs_rss_mib": baseline,
         "extra_peak_mib": peak_rss_mib() - baseline, "metrics": result}
  if gemm_fn is not None:
    gemm = []
    for _ in range(repeats + 1):                     # the first call compiles (XLA)
      start = time.perf_counter()
      gemm_fn(text, image)
      gemm.append(time.perf_counter() - start)
    out["gemm_seconds"] = min(gemm[1:])
  return out


def measure(method, n, dim, repeats):
  command = [sys.executable, os.path.abspath(__file__), "--case", method, "--ns", str(n),
             "--dim", str(dim), "--repeats", str(repeats)]
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def zeroshot_cost(n, samples, labels=18, seed=4):
  """Seconds for zero-shot metrics of `labels` labels (AUROC, AUPRC, F1, ... with bootstrap CIs of
  `samples` resamples) at N, from P(present) scores and 0/1 labels."""
  from medfinder_jax import zeroshot
  rng = np.random.default_rng(seed)
  truth = rng.random((n, labels)) < rng.uniform(0.02, 0.4, labels)
  scores = (rng.random((n, labels)) + 0.3 * truth).astype(np.float32)
  names = [f"label {j}" for j in range(labels)]
  zeroshot.classification_metrics(scores[:1000], truth[:1000], names, bootstrap_samples=8)
  start = time.perf_counter()
  zeroshot.classification_metrics(scores, truth, names, bootstrap_samples=samples)
  return {"n": n, "labels": labels, "samples": samples, "seconds": time.perf_counter() - start}


def cli_cost(n, dim, repeats=3):
  """Wall seconds of `launch.py metrics --bootstrap 0` on an npz of n pairs (process start-up,
  reading the file, both directions, writing metrics.json), best of `repeats`."""
  text, image = make_pairs(n, dim)
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "embeddings.npz")
    np.savez(npz, text_embeddings=text, image_embeddings=image,
             study_ids=np.array([f"s{i}" for i in range(n)]))
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "metrics", "--embeddings", npz,
               "--bootstrap", "0"]
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
      times.append(time.perf_counter() - start)
  return {"n": n, "dim": dim, "seconds": min(times)}


def bootstrap_cost(n, samples):
  """Seconds for percentile CIs of all 10 rank metrics (both directions) at N, B resamples."""
  from medfinder_jax import metrics
  rng = np.random.default_rng(3)
  ranks = {d: np.minimum(rng.geometric(0.001, size=n), n) for d in ("t2i", "i2t")}
  metrics.bootstrap_rank_intervals({d: r[:1000] for d, r in ranks.items()}, num_samples=8)
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
  parser.add_argument("--cli_n", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per case (best kept; default 2 up to N=8k, else 1)")
  parser.add_argument("--bootstrap_samples", type=int, default=1000)
  parser.add_argument("--parts", nargs="+", default=["metrics", "bootstrap", "zeroshot", "cli"],
                      choices=["metrics", "bootstrap", "zeroshot", "cli"])
  parser.add_argument("--json_out", default=None)
  parser.add_argument("--engines", nargs="+", default=["host", "jax"], choices=["host", "jax"],
                      help="rank engines measured (host: score_pass_host, jax: score_pass)")
  parser.add_argument("--case", choices=["ours", "ours_jax", "released"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    print(json.dumps(run_case(args.case, args.ns[0], args.dim, args.repeats or 1)))
    return

  rows, last_released, extra = [], None, {}
  for n in (args.ns if "metrics" in args.parts else []):
    repeats = args.repeats or (2 if n <= 8192 else 1)
    engines = {e: measure({"host": "ours", "jax": "ours_jax"}[e], n, args.dim, repeats)
               for e in args.engines}
    if n <= args.reference_max_n:
      theirs = last_released = measure("released", n, args.dim, repeats)
      # Equal up to float32 matmul rounding (a near-tie may flip: MnR by 1/N, R@K by 100/N).
      for mine in engines.values():
        mine["max_metric_diff"] = max(abs(mine["metrics"][d][m] - theirs["metrics"][d][m])
                                      for d in ("t2i", "i2t") for m in theirs["metrics"][d])
    else:
      theirs = extrapolate(last_released, n) if last_released else None
    for engine, mine in engines.items():
      rows.append({"n": n, "engine": engine, "ours": mine, "released": theirs})
      print(f"N={n}: ours ({engine}) {mine['seconds']:.2f}s {mine['extra_peak_mib']:.0f} MiB "
            f"(max |ours - released| over the 10 metrics: {mine.get('max_metric_diff', 'n/a')}); "
            "released "
            + (f"{theirs['seconds']:.2f}s {theirs['extra_peak_mib']:.0f} MiB"
               + (" (extrapolated)" if theirs.get("extrapolated") else "") if theirs else "n/a"),
            flush=True)
  if "bootstrap" in args.parts:
    extra["bootstrap"] = bootstrap_cost(max(args.ns), args.bootstrap_samples)
  if "zeroshot" in args.parts:
    extra["zeroshot"] = zeroshot_cost(max(args.ns), args.bootstrap_samples)
  if "cli" in args.parts:
    extra["cli"] = cli_cost(args.cli_n, args.dim)
  report(args, rows, extra)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"rows": rows, **extra}, f, indent=2)


def print_metric_table(args, rows):
  print(f"\nD = {args.dim}, both directions, {os.cpu_count()} CPU cores; "
        "time = best of repeats (first call incl. compile in parentheses); "
        "memory = peak RSS above the inputs")
  print("| N | engine | ours time | plain GEMM (same library) | ours/GEMM | ours memory "
        "| released time | released memory | time ratio (released/ours) | memory ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    mine, theirs = row["ours"], row["released"]
    mark = " (extrapolated)" if theirs and theirs.get("extrapolated") else ""
    their_cells = (f"{theirs['seconds']:.2f} s{mark} | {theirs['extra_peak_mib']:.0f} MiB{mark} | "
                   f"{theirs['seconds'] / mine['seconds']:.1f}x | "
                   f"{theirs['extra_peak_mib'] / max(mine['extra_peak_mib'], 1):.1f}x"
                   if theirs else "n/a | n/a | n/a | n/a")
    gemm = "BLAS" if row["engine"] == "host" else "XLA"
    ratio = mine["seconds"] / mine["gemm_seconds"]
    print(f"| {row['n']} | {row['engine']} | {mine['seconds']:.2f} s "
          f"({mine['first_call_s']:.2f}) | {mine['gemm_seconds']:.2f} s ({gemm}) | {ratio:.2f}x | "
          f"{mine['extra_peak_mib']:.0f} MiB | {their_cells} |")


def report(args, rows, extra):
  if rows:
    print_metric_table(args, rows)
  if "bootstrap" in extra:
    b = extra["bootstrap"]
    print(f"\nbootstrap CIs (10 metrics, {b['samples']} resamples) at N={b['n']}: "
          f"{b['seconds']:.2f} s")
  if "zeroshot" in extra:
    z = extra["zeroshot"]
    print(f"zero-shot ({z['labels']} labels, AUROC/AUPRC/F1 + {z['samples']} bootstrap "
          f"resamples) at N={z['n']}: {z['seconds']:.2f} s")
  if "cli" in extra:
    c = extra["cli"]
    print(f"launch.py metrics end to end (start-up included, no bootstrap) at N={c['n']}, "
          f"D={c['dim']}: {c['seconds']:.2f} s")


if __name__ == "__main__":
  main()
