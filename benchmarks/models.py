#!/usr/bin/env python3
"""Model measurements: parameter counts vs MONAI / HF, CPU forward latency of each tower (ours
under jit vs the PyTorch original), activation memory saved by remat, and compile time of the
full MedFinder at 224x224x96.

  python benchmarks/models.py                      # everything (several minutes on 2 cores)
  python benchmarks/models.py --only params,latency --repeats 5

Latency: median wall time of `--repeats` calls after one warm-up call, batch 1, float32.
Compile: jax.jit(...).lower(ShapeDtypeStructs).compile() of (a) encode_image, (b) the two-view
training forward and (c) its gradient w.r.t. all params (the bulk of a train step).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
from medfinder_jax import convert_weights  # noqa: E402
from medfinder_jax import text as text_lib  # noqa: E402
from medfinder_jax.models import bert  # noqa: E402
from medfinder_jax.models import fusion  # noqa: E402
from medfinder_jax.models import medfinder  # noqa: E402
from medfinder_jax.models import resnet3d  # noqa: E402
from medfinder_jax.models import vit3d  # noqa: E402

FULL_SHAPE = (224, 224, 96)
BIOBERT = bert.BertConfig(vocab_size=28996)  # BERT-base cased = BioBERT v1.1's architecture


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def torch_count(module):
  return sum(p.numel() for p in module.parameters())


def our_params(module, *inputs):
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def shape(*dims, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(dims, dtype)


def monai_resnet50():
  from monai.networks.nets import resnet  # pylint: disable=import-outside-toplevel
  return resnet.ResNet("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], spatial_dims=3,
                       n_input_channels=1, feed_forward=False).eval()


def monai_vit(img_size):
  from monai.networks.nets import vit  # pylint: disable=import-outside-toplevel
  return vit.ViT(in_channels=1, img_size=img_size, patch_size=16, classification=False,
                 spatial_dims=3).eval()


def hf_bert(config):
  import transformers  # pylint: disable=import-outside-toplevel
  fields = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                            "num_attention_heads", "intermediate_size")}
  return transformers.BertModel(transformers.BertConfig(**fields)).eval()


def print_params():
  print("\n## Parameter counts (ours from jax.eval_shape; reference = PyTorch module)")
  print(f"{'tower':44s} {'ours':>12s} {'reference':>12s}")
  ids = shape(1, 100, dtype=jnp.int32)
  minilm = convert_weights.load_bert_config(text_lib.resolve_text_model_path("minilm"))
  rows = [
      ("ResNet50 3D (MONAI ResNet, fc removed)",
       our_params(resnet3d.ResNet3D(), shape(1, 32, 32, 16, 1)), monai_resnet50),
      ("ViT 3D 224x224x96 /16 (MONAI ViT)",
       our_params(vit3d.ViT3D(), shape(1, *FULL_SHAPE, 1)), lambda: monai_vit(FULL_SHAPE)),
      ("BERT-base cased, vocab 28996 (HF BertModel)",
       our_params(bert.BertModel(BIOBERT), ids), lambda: hf_bert(BIOBERT)),
      ("all-MiniLM-L6-v2 (HF BertModel)", our_params(bert.BertModel(minilm), ids),
       lambda: hf_bert(minilm)),
  ]
  for name, ours, reference in rows:
    print(f"{name:44s} {count(ours):12,d} {torch_count(reference()):12,d}")
  print("(MONAI's ViT count includes 12 unused `norm_cross_attn` LayerNorms: 12 * 2 * 768 = "
        "18,432)")
  tokens = shape(1, 1176, 512)
  print(f"{'fusion (cross-attention, 512 wide, 8 heads)':44s} "
        f"{count(our_params(fusion.CrossAttentionFusion(8), tokens, tokens)):12,d} {'-':>12s}")
  for backbone in ("resnet50", "vit"):
    model = full_model(backbone, BIOBERT)
    params = jax.eval_shape(lambda v, i, m=model: m.init(jax.random.key(0), v, v, i, i,
                                                          train=False),
                            shape(1, *FULL_SHAPE, 1), ids)["params"]
    groups = ", ".join(f"{k} {count(v):,}" for k, v in params.items())
    print(f"MedFinder {backbone} + BERT-base: {count(params):,} ({groups})")


def median_time(fn, repeats):
  fn()  # warm-up: compiles under jit; PyTorch picks its kernels
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def jax_latency(module, variables, *inputs, repeats):
  apply = jax.jit(module.apply)
  return median_time(lambda: jax.block_until_ready(apply(variables, *inputs)), repeats)


def torch_latency(module, *inputs, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return median_time(lambda: module(*inputs), repeats)


def print_latency(repeats):
  import torch  # pylint: disable=import-outside-toplevel
  small = (64, 64, 32)
  print(f"\n## CPU forward latency, batch 1, fp32, median of {repeats} (ms); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads")
  print(f"{'tower (input)':52s} {'ours (jit)':>10s} {'PyTorch':>10s}")
  volume = np.random.default_rng(0).normal(size=(1, *small, 1)).astype(np.float32)
  volume_t = torch.from_numpy(np.transpose(volume, (0, 4, 1, 2, 3)))
  state = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}

  torch_resnet, ours = monai_resnet50(), resnet3d.ResNet3D()
  variables = convert_weights.import_monai_resnet(
      state(torch_resnet), jax.eval_shape(ours.init, jax.random.key(0), volume))
  print(f"{'ResNet50 3D (64x64x32 volume)':52s} "
        f"{jax_latency(ours, variables, volume, repeats=repeats):10.1f} "
        f"{torch_latency(torch_resnet, volume_t, repeats=repeats):10.1f}")

  torch_vit, ours = monai_vit(small), vit3d.ViT3D()
  variables = convert_weights.import_monai_vit(
      state(torch_vit), jax.eval_shape(ours.init, jax.random.key(0), volume))
  print(f"{'ViT 3D (64x64x32 volume, 32 patches)':52s} "
        f"{jax_latency(ours, variables, volume, repeats=repeats):10.1f} "
        f"{torch_latency(torch_vit, volume_t, repeats=repeats):10.1f}")

  folder = text_lib.resolve_text_model_path("minilm")
  tokenizer = text_lib.ReportTokenizer(folder, 100)
  ids, mask = tokenizer(["Bilateral pleural effusion with basal atelectasis. " * 12])
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  for name, config in (("all-MiniLM-L6-v2", convert_weights.load_bert_config(folder)),
                       ("BERT-base cased", BIOBERT)):
    torch_bert, ours = hf_bert(config), bert.BertModel(config)
    variables = convert_weights.import_hf_bert(state(torch_bert),
                                               convert_weights.bert_template(config))
    label = f"{name} (100 tokens)"
    print(f"{label:52s} {jax_latency(ours, variables, ids, mask, repeats=repeats):10.1f} "
          f"{torch_latency(torch_bert, ids_t, mask_t, repeats=repeats):10.1f}")

  module = fusion.CrossAttentionFusion(8)
  tokens = jax.random.normal(jax.random.key(0), (1, 1176, 512))
  variables = jax.jit(module.init)(jax.random.key(0), tokens, tokens)
  print(f"{'fusion (1176 x 512 tokens = ResNet50 at 224x224x96)':52s} "
        f"{jax_latency(module, variables, tokens, tokens, repeats=repeats):10.1f} {'-':>10s}")


def full_model(backbone, bert_config, dtype="float32", remat=False):
  config = default.get_config()
  config.model.backbone = backbone
  config.model.dtype = dtype
  config.model.remat = remat
  return medfinder.build_model(config.model, config.text, bert_config)


def timed_compile(fn, *args):
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory else float("nan")
  return lowered_at - start, done - lowered_at, temp


def compile_cases(model, specs, batch):
  """(name, function, abstract args) for encode_image, the training forward and its gradient."""
  volume, ids = shape(batch, *FULL_SHAPE, 1), shape(batch, 100, dtype=jnp.int32)

  def forward(v, a, b, i, m):
    return model.apply(v, a, b, i, m, train=True, rngs={"dropout": jax.random.key(0)},
                       mutable=["batch_stats"])

  def loss(params, rest, a, b, i, m):
    out, _ = forward({**rest, "params": params}, a, b, i, m)
    return jnp.sum(out["image"] * out["text"]) + jnp.sum((out["image_a"] - out["image_b"]) ** 2)

  rest = {k: v for k, v in specs.items() if k != "params"}
  return (("encode_image", lambda v, x: model.apply(v, x, method=model.encode_image),
           (specs, volume)),
          ("two-view train forward", forward, (specs, volume, volume, ids, ids)),
          ("gradient of the two-view forward", jax.grad(loss),
           (specs["params"], rest, volume, volume, ids, ids)))


def print_compile(backbones, batch, variants):
  print(f"\n## Compile on CPU at {'x'.join(map(str, FULL_SHAPE))}, batch {batch} per view, "
        "BERT-base text tower (lower s / compile s / XLA temp GiB)")
  for backbone in backbones:
    model = full_model(backbone, BIOBERT)
    start = time.perf_counter()
    variables = medfinder.initialize(model, jax.random.key(0), FULL_SHAPE, 100)
    jax.block_until_ready(variables)
    print(f"{backbone}: init_variables (compile + run) {time.perf_counter() - start:.1f} s")
    specs = jax.tree.map(lambda x: shape(*x.shape, dtype=x.dtype), variables)
    for variant in variants:
      dtype, _, remat = variant.partition("+")
      cases = compile_cases(full_model(backbone, BIOBERT, dtype, remat == "remat"), specs, batch)
      for name, fn, args in cases if variant == variants[0] else cases[-1:]:
        lower_s, compile_s, temp = timed_compile(fn, *args)
        print(f"{backbone} {variant:15s} {name:34s} {lower_s:6.1f} / {compile_s:6.1f} / "
              f"{temp:6.2f}")


def residual_gib(module, volume):
  """GiB that the backward pass keeps from the forward (JAX's saved residuals, float32)."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(module.init, jax.random.key(0), volume)
  variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    (pooled, _), _ = module.apply({**rest, "params": params}, volume, train=True,
                                  mutable=list(rest))
    return jnp.sum(pooled ** 2)

  return sum(r[0].size * r[0].dtype.itemsize for r in saved_residuals(loss, variables["params"])
             ) / 2**30


def print_remat(batch):
  print(f"\n## Rematerialization at {'x'.join(map(str, FULL_SHAPE))}, batch {batch}, fp32: "
        "activations saved for the backward pass (GiB, from the JAX trace)")
  volume = jnp.zeros((batch, *FULL_SHAPE, 1))
  for name, module in (("ResNet50 (remat per stage)", resnet3d.ResNet3D()),
                       ("ViT (remat per block)", vit3d.ViT3D())):
    print(f"{name:28s} off {residual_gib(module, volume):7.2f}   "
          f"on {residual_gib(module.clone(remat=True), volume):7.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="params,latency,remat,compile")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--backbones", default="resnet50,vit")
  parser.add_argument("--batch", type=int, default=1, help="per view, for the compile check")
  parser.add_argument("--variants", default="float32,bfloat16,bfloat16+remat",
                      help="compute dtype[+remat] variants; the gradient is compiled for each")
  args = parser.parse_args()
  parts = args.only.split(",")
  print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  if "params" in parts:
    print_params()
  if "latency" in parts:
    print_latency(args.repeats)
  if "remat" in parts:
    print_remat(args.batch)
  if "compile" in parts:
    print_compile(args.backbones.split(","), args.batch, args.variants.split(","))


if __name__ == "__main__":
  main()
