#!/usr/bin/env python3
"""MedFinder-JAX command line: phantom | convert | train | eval | metrics | embed | search |
index | index-ann | serve | demo.

Thin by design: parse flags, build the config, call one function per command
(medfinder_jax/commands/, data_prep/ and medfinder_jax/train.py do the work). Each command's
module is imported only when that command runs, so `metrics` and `search` never pay for
TensorFlow, and a user mistake anywhere is one line on stderr with exit code 2.
`--config configs/x.py[:arg]` picks a config file; `--config.section.key=value` overrides any field.
"""

import argparse
import json
import os
import sys

from medfinder_jax import config_utils
from medfinder_jax import errors

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")

# Flags of the released main_ddp.py -> config fields (value transforms where the meaning differs).
RELEASED_FLAGS = {
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


def add_released_args(parser):
  """The released code's flags, kept working (see README's flag table)."""
  for flag, (_, kind) in RELEASED_FLAGS.items():
    parser.add_argument(f"--{flag}", type=kind, default=None)
  parser.add_argument("--use_amp", action="store_true", help="bf16 compute (fp32 master params)")
  parser.add_argument("--use_wandb", action="store_true", help="log to wandb (mode online)")


def add_distributed_args(parser):
  """Multi-process flags (several hosts); SLURM / Open MPI / TPU environments are detected."""
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)


def start_distributed(args):
  """jax.distributed.initialize before any other JAX call, for commands that take the flags."""
  if not hasattr(args, "coordinator_address"):
    return
  from medfinder_jax import distributed  # pylint: disable=import-outside-toplevel  (jax)
  distributed.initialize_distributed(args.coordinator_address, args.num_processes,
                                     args.process_id)


def build_config(args, overrides):
  """Config file -> released-code flags -> --config.* overrides (later ones win)."""
  config = config_utils.load_config_file(args.config)
  released_overrides = {}
  for flag, (key, _) in RELEASED_FLAGS.items():
    value = getattr(args, flag, None)
    if value is not None:
      released_overrides[key] = str(value)
  if getattr(args, "use_amp", False):
    released_overrides["model.dtype"] = "bfloat16"
  if getattr(args, "use_wandb", False):
    released_overrides["wandb.mode"] = "online"
  config_utils.apply_overrides(config, released_overrides)
  config_utils.apply_overrides(config, overrides)
  return config_utils.check_config(config)


def make_parser():
  parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (help_text, add_args, _) in COMMANDS.items():
    add_args(sub.add_parser(name, help=help_text))
  return parser


def main(argv=None):
  """Runs one command; a user mistake (errors.UserError) is one line on stderr and exit 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # TensorFlow's start-up notices
  argv = sys.argv[1:] if argv is None else argv
  command = "launch.py"
  try:
    overrides, rest = config_utils.split_config_overrides(argv)
    args = make_parser().parse_args(rest)
    command = f"launch.py {args.command}"
    config = build_config(args, overrides) if hasattr(args, "config") else None
    start_distributed(args)
    _, _, run = COMMANDS[args.command]
    return run(args, config) or 0
  except errors.UserError as err:
    print(f"{command}: error: {err}", file=sys.stderr)
    return 2


# --- Commands ------------------------------------------------------------------------------------
# Each entry: name -> (help, add_arguments(parser), run(args, config) -> exit code).

def add_phantom_args(parser):
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--layout", choices=("bimcv", "ctrate", "dicom"), default="bimcv",
                      help="bimcv: CT*/ct/*.nii.gz + meta/*.csv; ctrate: CT-RATE's dataset/ "
                           "folders and CSVs; dicom: one DICOM series folder per study")
  parser.add_argument("--n", type=int, required=True, help="number of studies")
  parser.add_argument("--seed", type=int, default=0, help="corpus seed (deterministic output)")
  parser.add_argument("--folders", type=int, default=10, help="CT folders (10: 7/1/2 split)")
  parser.add_argument("--size", type=int, default=512,
                      help="nominal in-plane matrix (512 = realistic 0.55-0.98 mm pixels; "
                           "smaller = coarser voxels over the same anatomy)")
  parser.add_argument("--slices", type=int, default=100,
                      help="nominal slice count (varies 0.75-1.3x per study)")


def run_phantom(args, config):
  del config
  from data_prep import phantom_layouts  # pylint: disable=g-import-not-at-top
  csv_path = phantom_layouts.write_phantom_corpus(args.out, args.n, seed=args.seed,
                                                  folders=args.folders, size=args.size,
                                                  slices=args.slices, progress=True,
                                                  layout=args.layout)
  print(f"wrote {args.n} phantom studies under {args.out} in the {args.layout} layout "
        f"(CSV: {csv_path})")
  return 0


def add_convert_args(parser):
  add_config_args(parser)
  parser.add_argument("--data_root", default=None,
                      help="corpus root (BIMCV-R: CT*/ct/*.nii.gz, meta/*.csv; CT-RATE: dataset/), "
                           "local or on a Beam file system (gs://..., s3://...: README)")
  parser.add_argument("--layout", choices=("auto", "bimcv", "ctrate", "dicom"), default=None,
                      help="corpus layout (data.layout; default auto: detected, and printed)")
  parser.add_argument("--output_dir", default=None,
                      help="where the TFRecords go (sets data.tfrecord_dir)")
  parser.add_argument("--shape", default=None, help="X,Y,Z voxels (data.shape)")
  parser.add_argument("--split_by", choices=("folders", "rows"), default=None,
                      help="folders: paper's 7/1/2 CT folders; rows: released code's 70/10/20")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (data.workers; 0 = in this process)")
  parser.add_argument("--beam_pipeline_options", default=None,
                      help="run the conversion as an Apache Beam pipeline with these options "
                           "(TFDS's syntax: \"runner=DirectRunner,direct_num_workers=2\"; "
                           "Dataflow, Flink, Spark: README); needs requirements-beam.txt")


def run_convert(args, config):
  from data_prep import convert  # pylint: disable=g-import-not-at-top
  from data_prep import corpus_base  # pylint: disable=g-import-not-at-top
  data = config.data
  overrides = {"tfrecord_dir": args.output_dir, "shape": args.shape, "split_by": args.split_by,
               "workers": args.workers, "layout": args.layout}
  config_utils.apply_overrides(
      config, {f"data.{k}": str(v) for k, v in overrides.items() if v is not None})
  config_utils.check_config(config)
  if not data.tfrecord_dir:
    raise corpus_base.CorpusError("no output directory: pass --output_dir "
                                  "(or --config.data.tfrecord_dir)")
  if args.beam_pipeline_options is not None and args.workers is not None:
    raise corpus_base.CorpusError(
        f"--workers {args.workers} sizes the local pool; with --beam_pipeline_options the "
        f"runner's options do (direct_num_workers=N on the DirectRunner, max_num_workers on "
        f"Dataflow, parallelism on Flink)")
  try:
    if args.beam_pipeline_options is None:
      report = convert.convert_corpus(data, data.tfrecord_dir)
    else:
      from data_prep import beam_convert  # pylint: disable=g-import-not-at-top  (apache-beam)
      report = beam_convert.convert_corpus(data, data.tfrecord_dir, args.beam_pipeline_options)
  except KeyboardInterrupt:
    print("\nlaunch.py convert: interrupted; finished shards are kept, rerun the same command "
          "to resume", file=sys.stderr)
    return 130
  return 0 if report["num_converted"] else 1


def add_train_args(parser):
  add_config_args(parser)
  add_released_args(parser)
  add_distributed_args(parser)
  parser.add_argument("--eval_only", action="store_true",
                      help="the released code's evaluation mode: same as `launch.py eval "
                           "--model_path CKPT --split val` (needs --model_path)")
  parser.add_argument("--model_path", default=None, metavar="CKPT",
                      help="with --eval_only: the checkpoint to evaluate (see `eval --help`)")


def run_train(args, config):
  """Trains (or resumes, when output_dir holds checkpoints) the model of the config."""
  if args.eval_only:
    if not args.model_path:
      print("launch.py train: error: --eval_only needs --model_path CKPT", file=sys.stderr)
      return 2
    args.split, args.plots, args.bootstrap = "val", False, None
    return run_eval(args, config)
  from medfinder_jax import train  # pylint: disable=import-outside-toplevel
  try:
    summary = train.train_and_evaluate(config)
  except train.Diverged as err:
    print(f"launch.py train: {err}", file=sys.stderr)
    return train.EXIT_DIVERGED
  except KeyboardInterrupt:
    print("\nlaunch.py train: interrupted twice; stopped without a final checkpoint (the last "
          "saved one is kept); rerun the same command to resume", file=sys.stderr)
    return 130
  if summary["stopped"] == "finished":
    print(f"done: step {summary['step']}; checkpoints in {summary['checkpoint_dir']}, metrics "
          f"in {summary['metrics_file']}")
  return 0


def add_metrics_args(parser):
  parser.add_argument("--embeddings", required=True, metavar="FILE.npz",
                      help="paired embeddings in the interchange format (see README)")
  parser.add_argument("--output_dir", default=None, metavar="DIR",
                      help="write metrics.json (and plots) into DIR, like the other commands "
                           "(default: next to the npz)")
  parser.add_argument("--output", default=None, metavar="metrics.json",
                      help="the metrics file itself (overrides --output_dir for it)")
  parser.add_argument("--plots", nargs="?", const=True, default=None, metavar="DIR",
                      help="also write rank_histogram.png, recall_at_k.png and one ROC curve per "
                           "zero-shot label, into DIR (default: beside metrics.json)")
  parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                      help="bootstrap resamples for confidence intervals (default: config "
                           "eval.bootstrap_samples; 0 = none)")
  parser.add_argument("--chance", action="store_true", help="show chance levels in the table")
  parser.add_argument("--json", action="store_true", help="print the metrics as JSON, no table")
  add_config_args(parser)


def run_metrics(args, config):
  from medfinder_jax.commands import metrics  # pylint: disable=import-outside-toplevel
  result, written = metrics.run(config, args.embeddings, output_path=args.output,
                                output_dir=args.output_dir, plots_dir=args.plots,
                                bootstrap_samples=args.bootstrap)
  print(metrics.format_result(result, show_chance=args.chance, as_json=args.json))
  print("wrote " + ", ".join(written), file=sys.stderr if args.json else sys.stdout)
  return 0


def _add_model_path_arg(parser):
  parser.add_argument("--model_path", required=True, metavar="CKPT",
                      help="a run directory of launch.py train (or one of its step directories), "
                           "or the released code's best_model.pt / checkpoint_epoch_N.pt (then "
                           "the architecture comes from the config: --backbone, "
                           "--config.text.model_path, ...)")


def add_eval_args(parser):
  _add_model_path_arg(parser)
  parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                      help="split of the converted dataset (default: config eval.split)")
  parser.add_argument("--plots", action="store_true",
                      help="also write rank_histogram.png and recall_at_k.png")
  parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                      help="bootstrap resamples for confidence intervals (default: config "
                           "eval.bootstrap_samples; 0 = none)")
  add_config_args(parser)
  add_released_args(parser)
  add_distributed_args(parser)


def run_eval(args, config):
  """Writes embeddings.npz + metrics.json into --output_dir and prints the table (process 0)."""
  from medfinder_jax.commands import eval as eval_command  # pylint: disable=import-outside-toplevel
  if args.batch_size is not None:   # the released code evaluates with its --batch_size
    config.eval.batch_size_per_device = args.batch_size
  done = eval_command.run(config, args.model_path, split=args.split, plots=args.plots,
                          bootstrap_samples=args.bootstrap)
  if done is not None:
    print(eval_command.format_result(*done))
  return 0


def add_embed_args(parser):
  _add_model_path_arg(parser)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--split", choices=("train", "val", "test"),
                      help="embed this split of the converted dataset (--tfrecord_dir)")
  source.add_argument("--volumes", metavar="DIR",
                      help="embed the .nii/.nii.gz files under DIR (report: <name>.txt beside "
                           "<name>.nii.gz, optional), preprocessed as at conversion")
  parser.add_argument("--tfrecord_dir", default=None,
                      help="converted dataset (sets data.tfrecord_dir)")
  parser.add_argument("--data_root", default=None,
                      help="a converted dataset, like --tfrecord_dir (released code's flag)")
  parser.add_argument("--backbone", default=None, help="model.backbone of a released-code .pt file")
  parser.add_argument("--index", required=True, metavar="OUT", help="index directory to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing index")
  parser.add_argument("--append", action="store_true",
                      help="add the studies to the index as one more shard (created when absent; "
                           "several hosts may append to one index at once)")
  parser.add_argument("--replace", action="store_true",
                      help="with --append (implied): studies already in the index are replaced "
                           "(else they are an error)")
  parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                      help="stored embedding precision of a new index (default float16)")
  add_config_args(parser)
  add_distributed_args(parser)


def run_embed(args, config):
  from medfinder_jax.commands import embed  # pylint: disable=import-outside-toplevel
  if args.tfrecord_dir:
    config.data.tfrecord_dir = args.tfrecord_dir
  done = embed.run(config, args.model_path, args.index, split=args.split,
                   volumes_dir=args.volumes, overwrite=args.overwrite, append=args.append,
                   replace=args.replace, dtype=args.dtype)
  if done is not None:
    skipped, summary = embed.format_result(done)
    for line in skipped:
      print(line, file=sys.stderr)
    print(summary)
  return 0


def add_search_args(parser):
  parser.add_argument("--index", required=True, help="index directory (launch.py embed)")
  query = parser.add_mutually_exclusive_group(required=True)
  query.add_argument("--text", help="free-text query: finds studies")
  query.add_argument("--keyword", help="a finding, e.g. atelectasis: finds studies, and marks "
                                       "those whose report states it (negations excluded)")
  query.add_argument("--volume", metavar="FILE.nii.gz", help="a CT volume: finds reports")
  parser.add_argument("--top_k", type=int, default=None, metavar="K",
                      help="results to show (default: config eval.search_top_k)")
  parser.add_argument("--json", action="store_true", help="print the results as JSON")
  parser.add_argument("--model_path", default=None, metavar="CKPT",
                      help="the model that built the index, at another place (default: the "
                           "checkpoint recorded in the index); checked against its fingerprint")
  parser.add_argument("--exact", action="store_true",
                      help="brute-force search even when the index has an ANN index")
  add_config_args(parser)


def run_search(args, config):
  from medfinder_jax.commands import search  # pylint: disable=import-outside-toplevel
  result = search.run(config, args.index, text=args.text, keyword=args.keyword,
                      volume=args.volume, top_k=args.top_k, model_path=args.model_path,
                      exact=args.exact)
  print(json.dumps(result, indent=2) if args.json else search.format_result(result))
  return 0


def add_index_args(parser):
  parser.add_argument("--index", required=True, help="index directory (launch.py embed)")
  action = parser.add_mutually_exclusive_group(required=True)
  action.add_argument("--remove", nargs="+", metavar="STUDY_ID", help="remove these studies")
  action.add_argument("--remove_file", metavar="FILE", help="remove the study ids in FILE "
                                                             "(one a line)")
  action.add_argument("--info", action="store_true", help="print studies, shards, size, ANN")


def run_index(args, config):
  del config
  from medfinder_jax.commands import archive  # pylint: disable=import-outside-toplevel
  print(archive.run_index(args.index, remove=args.remove, remove_file=args.remove_file))
  return 0


def add_index_ann_args(parser):
  parser.add_argument("--index", required=True, help="index directory (launch.py embed)")
  parser.add_argument("--nlist", type=int, default=None,
                      help="IVF lists (default: about sqrt(N), a power of two)")
  parser.add_argument("--target_recall", type=float, default=0.95,
                      help="recall@10 against exact search that nprobe is tuned to reach")
  parser.add_argument("--queries", type=int, default=1000,
                      help="sampled report queries used to measure recall@10")


def run_index_ann(args, config):
  del config
  from medfinder_jax.commands import archive  # pylint: disable=import-outside-toplevel
  print(archive.run_index_ann(args.index, nlist=args.nlist, target_recall=args.target_recall,
                              queries=args.queries))
  return 0


def add_serve_args(parser):
  parser.add_argument("--index", required=True, help="index directory (launch.py embed)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8080)
  parser.add_argument("--model_path", default=None, metavar="CKPT",
                      help="the model that built the index, at another place (see search)")
  parser.add_argument("--max_top_k", type=int, default=100, help="largest top_k a request gets")
  parser.add_argument("--max_upload_mib", type=float, default=256.0,
                      help="largest uploaded volume (MiB)")
  add_config_args(parser)


def run_serve(args, config):
  from medfinder_jax import serve  # pylint: disable=import-outside-toplevel
  serve.serve(config, args.index, host=args.host, port=args.port, model_path=args.model_path,
              limits=serve.Limits(max_top_k=args.max_top_k,
                                  max_upload_bytes=int(args.max_upload_mib * 2**20)))
  return 0


def add_demo_args(parser):
  parser.add_argument("--output_dir", default="demo_output",
                      help="where the corpus, dataset, run, evaluation and plots go; a rerun "
                           "resumes (default: demo_output)")
  parser.add_argument("--n", type=int, default=None,
                      help="phantom studies (default: config demo.n)")
  parser.add_argument("--minutes", type=float, default=None,
                      help="training time budget in minutes (default: config demo.minutes)")
  parser.add_argument("--workers", type=int, default=2, help="conversion worker processes")
  parser.add_argument("--config", default=os.path.join(HERE, "configs", "demo.py"),
                      help="config file (default: configs/demo.py); --config.key=value overrides")


def run_demo(args, config):
  """phantom -> convert -> train -> test-split evaluation, with the table against chance."""
  from medfinder_jax.commands import demo  # pylint: disable=import-outside-toplevel
  defaults = config.get("demo") or {}
  n = args.n if args.n is not None else defaults.get("n", 0)
  minutes = args.minutes if args.minutes is not None else defaults.get("minutes", 0.0)
  try:
    demo.run(config, args.output_dir, n, minutes, workers=args.workers)
  except KeyboardInterrupt:
    print("\nlaunch.py demo: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  return 0


COMMANDS = {
    "phantom": ("write a synthetic chest-CT corpus (BIMCV-R, CT-RATE or DICOM layout)",
                add_phantom_args, run_phantom),
    "convert": ("convert a CT + report corpus into TFRecord shards (TFDS-readable)",
                add_convert_args, run_convert),
    "train": ("train (or resume) MedFinder on converted TFRecords, 1 to many devices/hosts",
              add_train_args, run_train),
    "metrics": ("retrieval metrics of an embeddings .npz (offline, CPU)", add_metrics_args,
                run_metrics),
    "eval": ("embeddings + retrieval metrics of a checkpoint on a split", add_eval_args,
             run_eval),
    "embed": ("build a search index from a converted split or a folder of NIfTI files",
              add_embed_args, run_embed),
    "search": ("search an index by text, keyword or CT volume", add_search_args, run_search),
    "index": ("remove studies from an index, or describe it", add_index_args, run_index),
    "index-ann": ("build the approximate-search (faiss IVF) index of an index, measuring its "
                  "recall@10", add_index_ann_args, run_index_ann),
    "serve": ("serve an index over HTTP: a JSON API and a web page (127.0.0.1 by default)",
              add_serve_args, run_serve),
    "demo": ("the whole chain on a phantom corpus, on CPU in minutes: phantom -> convert -> "
             "train -> test metrics", add_demo_args, run_demo),
}


if __name__ == "__main__":
  sys.exit(main())
