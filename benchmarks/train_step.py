#!/usr/bin/env python3
"""Train-step throughput, compile time, XLA FLOPs and host memory of MedFinder's full train step
(augmentation, two views, encoders, fusion, losses, AdamW; train_step.make_train_step) on synthetic
data, for any config / backbone / volume shape / batch / precision / remat / mesh.

  # tiny model on CPU, 1 vs 8 (fake) devices, same global batch of 8
  python benchmarks/train_step.py --config tiny --devices 1 --batch 8
  python benchmarks/train_step.py --config tiny --devices 8 --batch 1
  # compile only (abstract: nothing materialized) of the paper's model at full size
  python benchmarks/train_step.py --backbone resnet50 --shape 224,224,96 --batch 1 --compile_only

--devices N on a CPU host creates N fake devices (XLA_FLAGS) before jax starts. On GPUs it takes
the first N devices. Numbers: ms/step = wall time of --steps steps dispatched back to back (as
the train loop does, waiting once at the end; after --warmup untimed steps) / --steps,
volumes/s = global batch / ms/step (a volume = one study; each is augmented into two views),
compile = lower + compile of the step, FLOPs = XLA's cost analysis of the compiled SPMD program
(one device's share; x devices = per step), device args/temp = XLA's buffer plan for one device
(on CPU remat and bf16 do not lower it: check on GPU), peak RSS = this process's maximum
resident memory (host). The text tower gets random weights of the named architecture (weights
do not change the cost). Prints a table and, with --json, one JSON object per run.
"""

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT_MODELS = ("minilm", "bert-base")   # all-MiniLM-L6-v2 | BioBERT v1.1's shape (BERT-base cased)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default",
                      help="'default' (configs/default.py), 'tiny' (the tests' tiny model) or a "
                           "config file path")
  parser.add_argument("--backbone", choices=("resnet50", "vit"), default=None)
  parser.add_argument("--shape", default=None, help="X,Y,Z voxels (default: the config's)")
  parser.add_argument("--batch", type=int, default=None, help="per device and micro-batch")
  parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
  parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--devices", type=int, default=None, help="default: all")
  parser.add_argument("--mesh", default="-1,1",
                      help="data,fsdp[,spatial] sizes (-1 = the rest; spatial default 1)")
  parser.add_argument("--text", choices=TEXT_MODELS, default=None,
                      help="text tower architecture (default: minilm for tiny or a config whose "
                           "text.model_path is minilm, else bert-base)")
  parser.add_argument("--loss", default=None, help="clip | siglip | released")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--compile_only", action="store_true",
                      help="lower + compile from abstract shapes; run nothing")
  parser.add_argument("--json", action="store_true", help="also print the result as JSON")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any other config override, e.g. --set model.fusion.enabled=false")
  return parser.parse_args(argv)


def set_host_devices(count):
  """Fake CPU devices for --devices N; must run before jax is imported."""
  if count and count > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}").strip()


def build_config(args):
  from medfinder_jax import config_utils  # pylint: disable=import-outside-toplevel
  defaults = os.path.join(ROOT, "configs", "default.py")
  path = {"default": defaults, "tiny": defaults + ":tiny"}.get(args.config, args.config)
  config = config_utils.load_config_file(path)
  overrides = {}
  chosen = {"model.backbone": args.backbone, "data.shape": args.shape,
            "train.batch_size_per_device": args.batch, "train.grad_accum_steps": args.accum,
            "model.dtype": args.precision, "model.remat": args.remat, "loss.contrastive": args.loss}
  overrides.update({k: str(v) for k, v in chosen.items() if v is not None})
  overrides.update(dict(item.split("=", 1) for item in args.set))
  config_utils.apply_overrides(config, overrides)
  return config


def default_text(args, config):
  if args.text:
    return args.text
  return "minilm" if args.config == "tiny" or config.text.model_path == "minilm" else "bert-base"


# Dense bf16 peak of accelerators (TFLOP/s), for MFU; matched against jax's device_kind.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(device):
  kind = getattr(device, "device_kind", "")
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return None


def device_peak_memory_gib(device):
  """Peak bytes the device allocator held (GPU/TPU); None where not reported (CPU)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 3)


def text_config(name):
  from medfinder_jax import convert_weights  # pylint: disable=import-outside-toplevel
  from medfinder_jax import text as text_lib  # pylint: disable=import-outside-toplevel
  from medfinder_jax.models import bert  # pylint: disable=import-outside-toplevel
  if name == "minilm":
    return convert_weights.load_bert_config(text_lib.resolve_text_model_path("minilm"))
  return bert.BertConfig(vocab_size=28996)


def synthetic_batch(config, shape, rows, vocab, seed=0):
  """A host batch like input_pipeline's: uint8 volumes, token ids with a realistic length."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  tokens = config.text.max_tokens
  ids = rng.integers(1000, vocab, size=(rows, tokens), dtype=np.int32)
  mask = np.zeros((rows, tokens), np.int32)
  mask[:, :min(tokens, 80)] = 1
  return {"volume": rng.integers(0, 256, size=(rows, *shape), dtype=np.uint8),
          "input_ids": ids * mask, "attention_mask": mask}


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def flops_of(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def device_memory(compiled):
  """XLA's buffer plan for one device: state/batch arguments, outputs, temporaries (GiB).
  With the state donated, arguments and outputs share buffers: peak ~ arguments + temporaries."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return {}
  if stats is None:
    return {}
  gib = lambda n: round(n / 2**30, 3)  # noqa: E731
  return {"device_args_gib": gib(stats.argument_size_in_bytes),
          "device_temp_gib": gib(stats.temp_size_in_bytes),
          "device_out_gib": gib(stats.output_size_in_bytes)}


def measure(args):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_prep import schema  # pylint: disable=import-outside-toplevel
  from medfinder_jax import loading  # pylint: disable=import-outside-toplevel
  from medfinder_jax import sharding  # pylint: disable=import-outside-toplevel
  from medfinder_jax import train_step  # pylint: disable=import-outside-toplevel

  config = build_config(args)
  shape = tuple(config.data.shape)
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  sizes = [int(x) for x in args.mesh.split(",")]
  config.mesh.data, config.mesh.fsdp, config.mesh.spatial = (sizes + [1])[:3]
  mesh = sharding.make_mesh(config.mesh, devices)
  text_name = default_text(args, config)
  bert_config = text_config(text_name)
  model = loading.build_model(config, bert_config, mesh)
  tx = train_step.make_optimizer(config.train, total_steps=10_000)
  rules = sharding.PartitionRules.from_config(config.mesh)
  spec = schema.DatasetSpec("<synthetic>", schema.PreprocessParams(shape=tuple(shape)))
  abstract = train_step.abstract_train_state(model, tx, config, shape, mesh, rules)
  step = train_step.make_train_step(config, spec.intensity, mesh,
                                    jax.tree.map(lambda x: x.sharding, abstract))
  key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
  start = time.perf_counter()
  lowered = step.lower(abstract, train_step.abstract_batch(config, spec, mesh), key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  global_batch, local_batch = sharding.batch_rows(config.train.batch_size_per_device, mesh,
                                                  args.accum)
  result = {"backbone": config.model.backbone, "shape": list(shape), "devices": mesh.size,
            "mesh": dict(mesh.shape), "batch_per_device": int(config.train.batch_size_per_device),
            "accum": args.accum, "global_batch": global_batch, "precision": args.precision,
            "remat": bool(args.remat), "text": text_name,
            "loss": config.loss.contrastive, "platform": devices[0].platform,
            "compile_s": round(compile_s, 2),
            "gflops_per_step_per_device": round(flops_of(compiled) / 1e9, 3),
            "gflops_per_step": round(flops_of(compiled) * mesh.size / 1e9, 3)}
  result.update(device_memory(compiled))
  if not args.compile_only:
    result.update(run_steps(args, config, model, tx, rules, mesh, shape, compiled,
                            (global_batch, local_batch), bert_config.vocab_size))
  result["peak_rss_gib"] = round(peak_rss_gib(), 3)
  return result


def run_steps(args, config, model, tx, rules, mesh, shape, compiled, rows, vocab):
  """Times `args.steps` steps of the compiled train step on one synthetic batch; rows: the
  (global, this process's) rows of a batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from medfinder_jax import sharding  # pylint: disable=import-outside-toplevel
  from medfinder_jax import train_step  # pylint: disable=import-outside-toplevel
  global_batch, local_batch = rows
  state = train_step.create_train_state(model, tx, config, shape, jax.random.key(0), mesh, rules)
  batch = sharding.make_global_batch(synthetic_batch(config, shape, local_batch, vocab), mesh)
  key = sharding.replicate(np.asarray(jax.random.key_data(jax.random.key(0))), mesh)
  for _ in range(args.warmup):
    state, _ = compiled(state, batch, key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):   # dispatched back to back, as the train loop does
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready((state, metrics))
  per_step = (time.perf_counter() - start) / args.steps
  device = mesh.devices.flat[0]
  flops = flops_of(compiled) * mesh.size
  result = {"ms_per_step": round(1000 * per_step, 2), "steps_per_s": round(1 / per_step, 3),
            "volumes_per_s": round(global_batch / per_step, 2),
            "achieved_tflops": round(flops / per_step / 1e12, 4),
            "device_kind": getattr(device, "device_kind", ""),
            "peak_device_memory_gib": device_peak_memory_gib(device),
            "last_loss": float(jax.device_get(metrics["loss"]))}
  peak = peak_tflops(device)
  if peak and device.platform != "cpu":
    result["mfu_percent"] = round(100 * result["achieved_tflops"] / (peak * mesh.size), 2)
  return result


def print_row(r):
  timing = ("" if "ms_per_step" not in r else
            f"  {r['ms_per_step']:9.1f} ms/step  {r['steps_per_s']:7.3f} steps/s  "
            f"{r['volumes_per_s']:8.2f} vol/s  {r['achieved_tflops']:.3f} TFLOP/s"
            + (f"  MFU {r['mfu_percent']:.1f}%" if "mfu_percent" in r else ""))
  print(f"{r['backbone']} {'x'.join(map(str, r['shape']))} {r['precision']}"
        f"{' remat' if r['remat'] else ''}  {r['platform']} x{r['devices']} {r['mesh']}  "
        f"batch {r['batch_per_device']}/dev x{r['accum']} = {r['global_batch']}  "
        f"compile {r['compile_s']:.1f} s  {r['gflops_per_step']:.2f} GFLOP/step{timing}  "
        f"device: args {r.get('device_args_gib', float('nan')):.2f} + temp "
        f"{r.get('device_temp_gib', float('nan')):.2f} GiB  "
        f"peak RSS {r['peak_rss_gib']:.2f} GiB")


def main(argv=None):
  args = parse_args(argv)
  set_host_devices(args.devices)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  result = measure(args)
  print_row(result)
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
