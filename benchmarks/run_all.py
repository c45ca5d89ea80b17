"""Runs the train-step benchmarks of both frameworks and prints one table with JAX/PyTorch ratios.

Each case runs in its own process (clean memory figures, one device): benchmarks/train_step.py
for JAX and benchmarks/torch_reference.py for the released PyTorch computation, with the same
shapes, batch, text tower and precision. The like-for-like JAX row uses configs/released_code.py (one
view, no fusion, the released code's loss: what the PyTorch reference computes, plus our on-device
augmentation); the "paper" rows add two views, fusion and the CLIP loss.

  python benchmarks/run_all.py                 # CPU set: tiny and reduced-shape ResNet
  python benchmarks/run_all.py --set gpu       # one GPU: resnet50 and vit at 224x224x96
  python benchmarks/run_all.py --set cpu --out results.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELEASED_CONFIG = os.path.join(ROOT, "configs", "released_code.py")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")

SMALL_RESNET = {"layers": "1,1,1,1", "widths": "16,32,64,128", "conv1_kernel": "3",
                "conv1_stride": "2"}


def jax_case(name, config, shape, batch, text, precision="float32", remat=False, resnet=None,
             backbone="resnet50", steps=5):
  argv = [sys.executable, os.path.join(HERE, "train_step.py"), "--config", config,
          "--backbone", backbone, "--shape", shape, "--batch", str(batch), "--text", text,
          "--precision", precision, "--devices", "1", "--steps", str(steps), "--warmup", "2",
          "--json"]
  argv += ["--remat"] if remat else []
  for key, value in (resnet or {}).items():
    argv += ["--set", f"model.resnet.{key}={value}"]
  return {"name": name, "framework": "jax", "argv": argv}


def torch_case(name, shape, batch, text, amp=None, resnet=None, backbone="resnet50", steps=5):
  argv = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--backbone", backbone,
          "--shape", shape, "--batch", str(batch), "--text", text, "--steps", str(steps),
          "--warmup", "2", "--json"]
  if amp == "off":
    argv += ["--no_amp"]
  elif amp:
    argv += ["--amp", "--amp_dtype", amp]
  resnet = resnet or {}
  for key, flag in (("layers", "--resnet_layers"), ("widths", "--resnet_widths"),
                    ("conv1_kernel", "--conv1_kernel"), ("conv1_stride", "--conv1_stride")):
    if key in resnet:
      argv += [flag, resnet[key]]
  return {"name": name, "framework": "pytorch", "argv": argv}


def cpu_set():
  cases = []
  for label, shape, batch, resnet in (("small resnet 64x64x32", "64,64,32", 8, SMALL_RESNET),
                                      ("resnet50 32x32x16", "32,32,16", 2, None)):
    cases += [torch_case(label, shape, batch, "minilm", amp="off", resnet=resnet, steps=3),
              jax_case(label, RELEASED_CONFIG, shape, batch, "minilm", resnet=resnet, steps=3),
              jax_case(label + " (paper: 2 views+fusion)", DEFAULT_CONFIG, shape, batch,
                       "minilm", resnet=resnet, steps=3)]
  return cases


def gpu_set():
  shape = "224,224,96"
  return [
      torch_case("resnet50 224x224x96 b4", shape, 4, "bert-base", amp="float16"),
      jax_case("resnet50 224x224x96 b4", RELEASED_CONFIG, shape, 4, "bert-base", "bfloat16"),
      jax_case("resnet50 224x224x96 b4 (paper)", DEFAULT_CONFIG, shape, 4, "bert-base",
               "bfloat16"),
      jax_case("resnet50 224x224x96 b8 bf16+remat", RELEASED_CONFIG, shape, 8, "bert-base",
               "bfloat16", remat=True),
      torch_case("vit 224x224x96 b4", shape, 4, "bert-base", amp="float16", backbone="vit"),
      jax_case("vit 224x224x96 b4", RELEASED_CONFIG, shape, 4, "bert-base", "bfloat16",
               backbone="vit"),
  ]


def run_case(case, timeout):
  start = time.time()
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
  try:
    proc = subprocess.run(case["argv"], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**case, "error": f"timed out after {timeout} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {**case, "error": f"exit {proc.returncode}: {tail}"}
  return {**case, "result": json.loads(lines[-1]), "wall_s": round(time.time() - start, 1)}


def table(rows):
  """Rows grouped by case name; each JAX row shows its ratio to the PyTorch row of its group."""
  torch_rate = {}
  for row in rows:
    if row["framework"] == "pytorch" and "result" in row:
      torch_rate[row["name"]] = row["result"]["volumes_per_s"]
  lines = [f"{'case':44s} {'framework':9s} {'ms/step':>9s} {'vol/s':>8s} {'TFLOP/s':>8s} "
           f"{'mem GiB':>8s} {'vs torch':>8s}"]
  for row in rows:
    if "error" in row:
      lines.append(f"{row['name']:44s} {row['framework']:9s} ERROR {row['error'][:200]}")
      continue
    r = row["result"]
    base = next((v for k, v in torch_rate.items() if row["name"].startswith(k)), None)
    ratio = f"{r['volumes_per_s'] / base:7.2f}x" if base and row["framework"] == "jax" else ""
    memory = r.get("peak_device_memory_gib") or r.get("peak_rss_gib")
    lines.append(f"{row['name']:44s} {row['framework']:9s} {r['ms_per_step']:9.1f} "
                 f"{r['volumes_per_s']:8.2f} {r['achieved_tflops']:8.3f} {memory:8.2f} {ratio:>8s}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--set", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--out", default="", help="write all results as JSON here")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
  parser.add_argument("--only", default="", help="run cases whose name contains this")
  args = parser.parse_args(argv)
  cases = cpu_set() if args.set == "cpu" else gpu_set()
  cases = [c for c in cases if args.only in c["name"]]
  rows = []
  for case in cases:
    row = run_case(case, args.timeout)
    rows.append(row)
    status = row.get("error", "")[:120] or f"{row['result']['volumes_per_s']} vol/s"
    print(f"[{row['framework']}] {row['name']}: {status}", flush=True)
  print()
  print(table(rows))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump([{k: v for k, v in r.items() if k != "argv"} | {"argv": r["argv"][1:]}
                 for r in rows], f, indent=2)
  return 0 if all("result" in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
