#!/usr/bin/env python3
"""MedFinder-JAX command line: phantom | convert | train | eval | metrics | embed | search | demo.

Thin by design: parse flags, build the config, call one function per command.
`--config configs/x.py[:arg]` picks a config file; `--config.section.key=value` overrides any field.
"""

import argparse
import json
import os
import sys

from medfinder_jax import config_utils

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")

# Flags of the released main_ddp.py -> config fields (value transforms where the meaning differs).
SEED_FLAGS = {
    "data_root": ("data.data_root", str),
    "output_dir": ("output_dir", str),
    "backbone": ("model.backbone", str),
    "batch_size": ("train.batch_size_per_device", int),
    "epochs": ("train.epochs", int),
    "lr": ("train.lr", float),
    "alpha": ("loss.alpha", float),
    "seed": ("seed", int),
    "wandb_project": ("wandb.project", str),
    "wandb_name": ("wandb.name", str),
}


def add_config_args(parser):
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="config file (get_config()), optionally file.py:arg; "
                           "override fields with --config.key=value")


def add_seed_args(parser):
  """The released code's flags, kept working (see README's flag table)."""
  for flag, (_, kind) in SEED_FLAGS.items():
    parser.add_argument(f"--{flag}", type=kind, default=None)
  parser.add_argument("--use_amp", action="store_true", help="bf16 compute (fp32 master params)")
  parser.add_argument("--use_wandb", action="store_true", help="log to wandb (mode online)")


def build_config(args, overrides):
  """Config file -> seed-style flags -> --config.* overrides (later ones win)."""
  config = config_utils.load_config_file(args.config)
  seed_overrides = {}
  for flag, (key, _) in SEED_FLAGS.items():
    value = getattr(args, flag, None)
    if value is not None:
      seed_overrides[key] = str(value)
  if getattr(args, "use_amp", False):
    seed_overrides["model.dtype"] = "bfloat16"
  if getattr(args, "use_wandb", False):
    seed_overrides["wandb.mode"] = "online"
  config_utils.apply_overrides(config, seed_overrides)
  config_utils.apply_overrides(config, overrides)
  return config


def make_parser():
  parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (help_text, add_args, _) in COMMANDS.items():
    add_args(sub.add_parser(name, help=help_text))
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    overrides, rest = config_utils.split_config_overrides(argv)
    args = make_parser().parse_args(rest)
    config = build_config(args, overrides) if hasattr(args, "config") else None
  except config_utils.ConfigError as err:
    print(f"launch.py: error: {err}", file=sys.stderr)
    return 2
  _, _, run = COMMANDS[args.command]
  return run(args, config) or 0


# --- Commands ------------------------------------------------------------------------------------
# Each entry: name -> (help, add_arguments(parser), run(args, config) -> exit code).



def add_metrics_args(parser):
  parser.add_argument("--embeddings", required=True, metavar="FILE.npz",
                      help="paired embeddings in the interchange format (see README)")
  parser.add_argument("--output", default=None, metavar="metrics.json",
                      help="where to write the metrics (default: metrics.json next to the npz)")
  parser.add_argument("--plots", default=None, metavar="DIR",
                      help="also write rank_histogram.png and recall_at_k.png into DIR")
  parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                      help="bootstrap resamples for confidence intervals (default: config "
                           "eval.bootstrap_samples; 0 = none)")
  parser.add_argument("--chance", action="store_true", help="show chance levels in the table")
  parser.add_argument("--json", action="store_true", help="print the metrics as JSON, no table")
  add_config_args(parser)


def run_metrics(args, config):
  from medfinder_jax import interchange, metrics
  try:
    result, written = interchange.evaluate_embeddings_file(
        args.embeddings, config.eval, seed=config.seed, output_path=args.output,
        plots_dir=args.plots, bootstrap_samples=args.bootstrap)
  except interchange.InterchangeError as err:
    print(f"launch.py metrics: error: {err}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(metrics.format_metrics_table(result, show_chance=args.chance))
  print("wrote " + ", ".join(written), file=sys.stderr if args.json else sys.stdout)
  return 0


COMMANDS = {
    "metrics": ("retrieval metrics of an embeddings .npz (offline, CPU)", add_metrics_args,
                run_metrics),
}


if __name__ == "__main__":
  sys.exit(main())
