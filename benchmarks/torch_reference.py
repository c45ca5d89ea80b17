"""The released PyTorch MedFinder's train step, timed like benchmarks/train_step.py.

As main_ddp.py builds it (docs/released_code.md): MONAI ResNet50 3D (bottleneck,
[3,4,6,3], 1 channel, conv1 7^3 stride 1, fc removed) + Linear(2048, 512), a frozen BertModel
(dropout on, as in the released code) + Linear(hidden, 512) on the CLS state, loss
CE(text @ image.T / 0.07, arange(B)), AdamW (lr 1e-4, wd 0.01) on the trainable parameters.
On GPU: AMP (float16 autocast + GradScaler, as the released code; --amp_dtype bfloat16 for bf16) and
channels_last_3d; one view per study, augmentation outside the step (the released code's data loader).
The --backbone vit variant uses MONAI's ViT (the released code's intended ViT branch).

Test-only: needs torch and monai (requirements-dev.txt); never imported by the package.

  python benchmarks/torch_reference.py --shape 64,64,32 --batch 2 --steps 5 --json
Reports ms/step, volumes/s, FLOPs per step (torch's FlopCounterMode), achieved TFLOP/s,
peak device memory (GPU) and peak RSS.
"""

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backbone", choices=("resnet50", "vit"), default="resnet50")
  parser.add_argument("--shape", default="224,224,96", help="X,Y,Z voxels")
  parser.add_argument("--batch", type=int, default=4, help="volumes per step (one device)")
  parser.add_argument("--text", choices=("minilm", "bert-base"), default="bert-base")
  parser.add_argument("--tokens", type=int, default=100)
  parser.add_argument("--resnet_layers", default="3,4,6,3")
  parser.add_argument("--resnet_widths", default="64,128,256,512")
  parser.add_argument("--conv1_kernel", type=int, default=7)
  parser.add_argument("--conv1_stride", type=int, default=1)
  parser.add_argument("--amp", action="store_true", help="autocast (default on GPU)")
  parser.add_argument("--no_amp", action="store_true")
  parser.add_argument("--amp_dtype", choices=("float16", "bfloat16"), default="float16")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
  parser.add_argument("--json", action="store_true")
  return parser.parse_args(argv)


def text_tower(name):
  import transformers  # pylint: disable=import-outside-toplevel
  if name == "minilm":
    sys.path.insert(0, ROOT)
    from medfinder_jax import text as text_lib  # pylint: disable=import-outside-toplevel
    config = transformers.BertConfig.from_pretrained(text_lib.resolve_text_model_path("minilm"))
  else:
    config = transformers.BertConfig(vocab_size=28996)   # BioBERT v1.1 = BERT-base cased
  return transformers.BertModel(config, add_pooling_layer=True), config


class ReleasedModel:
  """The released code's modules and its train-step computation (kept as plain attributes)."""

  def __init__(self, args, shape, device):
    import torch  # pylint: disable=import-outside-toplevel
    from monai.networks.nets import resnet, vit  # pylint: disable=import-outside-toplevel
    if args.backbone == "resnet50":
      self.image = resnet.ResNet(
          "bottleneck", [int(x) for x in args.resnet_layers.split(",")],
          [int(x) for x in args.resnet_widths.split(",")], spatial_dims=3, n_input_channels=1,
          conv1_t_size=args.conv1_kernel, conv1_t_stride=args.conv1_stride, feed_forward=False)
      features = 4 * int(args.resnet_widths.split(",")[-1])
    else:
      self.image = vit.ViT(1, shape, 16, hidden_size=768, mlp_dim=3072, num_layers=12,
                           num_heads=12, classification=False, spatial_dims=3)
      features = 768
    self.image_projection = torch.nn.Linear(features, 512)
    self.text, config = text_tower(args.text)
    self.text_projection = torch.nn.Linear(config.hidden_size, 512)
    for p in self.text.parameters():
      p.requires_grad_(False)           # the released code freezes BERT (dropout stays on)
    self.modules = [self.image, self.image_projection, self.text, self.text_projection]
    for m in self.modules:
      m.to(device).train()
    if device.type == "cuda" and args.backbone == "resnet50":
      self.image.to(memory_format=torch.channels_last_3d)
    self.vocab = config.vocab_size
    self.backbone = args.backbone

  def trainable(self):
    return [p for m in self.modules for p in m.parameters() if p.requires_grad]

  def loss(self, volume, ids, mask):
    import torch  # pylint: disable=import-outside-toplevel
    features = self.image(volume)
    if self.backbone == "vit":
      features = features[0].mean(dim=1)
    image = self.image_projection(features)
    text = self.text_projection(self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    logits = text @ image.t() / 0.07
    return torch.nn.functional.cross_entropy(logits.float(),
                                             torch.arange(len(logits), device=logits.device))


def measure(args):
  import torch  # pylint: disable=import-outside-toplevel
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  use_amp = (args.amp or device.type == "cuda") and not args.no_amp
  amp_dtype = getattr(torch, args.amp_dtype)
  shape = tuple(int(s) for s in args.shape.split(","))
  torch.manual_seed(0)
  model = ReleasedModel(args, shape, device)
  optimizer = torch.optim.AdamW(model.trainable(), lr=1e-4, weight_decay=0.01)
  scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
  volume = torch.rand(args.batch, 1, *shape, device=device)
  if device.type == "cuda" and args.backbone == "resnet50":
    volume = volume.contiguous(memory_format=torch.channels_last_3d)
  ids = torch.randint(1000, model.vocab, (args.batch, args.tokens), device=device)
  mask = torch.zeros_like(ids)
  mask[:, :min(args.tokens, 80)] = 1
  ids = ids * mask

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
      loss = model.loss(volume, ids, mask)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  flops = count_flops(step)
  for _ in range(args.warmup):
    step()
  sync(device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync(device)
  per_step = (time.perf_counter() - start) / args.steps
  result = {"framework": "pytorch", "backbone": args.backbone, "shape": list(shape),
            "batch": args.batch, "text": args.text, "platform": device.type,
            "precision": (args.amp_dtype if use_amp else "float32"),
            "channels_last_3d": device.type == "cuda" and args.backbone == "resnet50",
            "gflops_per_step": round(flops / 1e9, 3), "ms_per_step": round(1000 * per_step, 2),
            "steps_per_s": round(1 / per_step, 3),
            "volumes_per_s": round(args.batch / per_step, 2),
            "achieved_tflops": round(flops / per_step / 1e12, 4),
            "last_loss": float(loss.detach().float().cpu()),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
  if device.type == "cuda":
    result["peak_device_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    result["device_kind"] = torch.cuda.get_device_name()
  result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
  return result


def count_flops(step):
  """FLOPs of one train step (forward + backward), by torch's FlopCounterMode."""
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  return float(counter.get_total_flops())


def sync(device):
  import torch  # pylint: disable=import-outside-toplevel
  if device.type == "cuda":
    torch.cuda.synchronize()


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  print(f"pytorch {result['backbone']} {'x'.join(map(str, result['shape']))} "
        f"{result['precision']} {result['platform']}  batch {result['batch']}  "
        f"{result['gflops_per_step']:.2f} GFLOP/step  {result['ms_per_step']:.1f} ms/step  "
        f"{result['volumes_per_s']:.2f} vol/s  {result['achieved_tflops']:.3f} TFLOP/s  "
        f"peak RSS {result['peak_rss_gib']:.2f} GiB")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
