"""Test helpers: a model saved as the released code's PyTorch file or as our training checkpoint,
and a constructed model whose image and report embeddings coincide on a set of studies (a
stand-in for a trained model).

export_released_state_dict is the inverse of convert_weights.import_released_checkpoint (same key rules,
layouts transposed back), so a Flax model of ours can be written as a `best_model.pt`.
"""

import flax
import jax
import numpy as np

from medfinder_jax import convert_weights
from medfinder_jax import loading


def import_monai(importer, model, ours, volume):
  """A MONAI torch model's state dict imported (by `importer`) into our Flax module's params."""
  template = jax.eval_shape(lambda: ours.init(jax.random.key(0), volume))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return importer(state, template)


def torch_call(model, volume):
  """Runs a torch model without grad on our (B, X, Y, Z, 1) volume, as PyTorch's (B, 1, X, Y, Z)."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.from_numpy(np.transpose(volume, (0, 4, 1, 2, 3))))


def export_released_state_dict(variables, backbone="resnet50"):
  """MedFinder variables (fusion disabled) -> {released state-dict key: numpy array}; the loss
  scalars, which the released code does not have, are left out."""
  key_fn = convert_weights.released_key_fn(backbone)
  state = {}
  for path, value in flax.traverse_util.flatten_dict(jax.device_get(variables)).items():
    if "/".join(path).startswith(convert_weights.RELEASED_LACKS):
      continue
    value = np.asarray(value)
    name, _ = convert_weights._leaf_to_torch(path[-1], value)  # pylint: disable=protected-access
    if path[-1] == "kernel":   # Flax conv DHWIO / dense (in, out) -> torch OIDHW / (out, in)
      value = value.transpose(4, 3, 0, 1, 2) if value.ndim == 5 else value.T
    state[key_fn((*path[1:-1], name))] = np.ascontiguousarray(value)
  return state


def write_released_checkpoint(path, variables, backbone="resnet50", training_dict=False):
  """Saves variables as the released code's best_model.pt (or checkpoint_epoch_N.pt with training_dict)."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {k: torch.from_numpy(v.copy())
           for k, v in export_released_state_dict(variables, backbone).items()}
  torch.save({"epoch": 1, "model_state_dict": state} if training_dict else state, str(path))
  return str(path)


def write_our_checkpoint(output_dir, config, variables, dataset_spec, step=7, val_r10=50.0):
  """Saves variables as step `step` of a launch.py train run in `output_dir` (checkpoint.py's
  format: the variables, a stand-in optimizer state, meta, val metrics)."""
  from medfinder_jax import checkpoint  # pylint: disable=import-outside-toplevel
  meta = checkpoint.build_meta(
      step=step, epoch=1, batches_consumed=step, seed=config.seed,
      rng_key_data=jax.random.key_data(jax.random.key(config.seed)), config=config,
      dataset_spec=dataset_spec, process_count=1, global_batch=8,
      val_metrics={"t2i": {"R@10": val_r10}})
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(output_dir), enable_async=False)
  checkpoint.save(manager, step, jax.device_get(variables), {"count": np.zeros((), np.int32)},
                  meta, {checkpoint.BEST_METRIC: val_r10})
  manager.wait_until_finished()
  manager.close()
  return str(output_dir)


def pooled_image_features(model, variables, unit_volumes):
  """(B, F) pooled image-encoder features of [0, 1] volumes (B, X, Y, Z) (before projection)."""
  return np.asarray(model.apply(variables, unit_volumes[..., None],
                                method=lambda m, x: m.image_encoder(x, False)[0]), np.float64)


def align_image_projection(model, variables, unit_volumes, text_embeddings):
  """Variables whose image projection maps each volume's features onto its paired text embedding.

  Least squares (minimum norm) for the projection kernel and bias: with fewer studies than
  features the fit is exact, so image and text embeddings of these studies coincide, as after
  perfect training. The model must have fusion disabled (the projection is then the last layer).
  """
  features = pooled_image_features(model, variables, unit_volumes)
  design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  solution, *_ = np.linalg.lstsq(design, np.asarray(text_embeddings, np.float64), rcond=None)
  params = flax.core.unfreeze(jax.device_get(variables["params"]))
  params["image_projection"] = {"kernel": solution[:-1].astype(np.float32),
                                "bias": solution[-1].astype(np.float32)}
  return {**variables, "params": params}


_ALIGNED = {}


def aligned_model(dataset_dir, tmp_path_factory, split="test"):
  """The tiny model (fusion disabled) aligned on `split` of a converted phantom dataset, saved
  both as a released-code `best_model.pt` and as our checkpoint (cached per dataset and split).

  Returns a namespace: config, model, variables, study_ids, reports, source_paths (relative to
  `raw_dir`, the phantom corpus), unit_volumes, image / text (reference embeddings from
  model.apply, one study per row, dataset order), released_path, run_dir, dataset_dir.
  """
  key = (dataset_dir, split)
  if key in _ALIGNED:
    return _ALIGNED[key]
  import os  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from medfinder_jax import text as text_lib  # pylint: disable=import-outside-toplevel
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"model.fusion.enabled": False})
  model, variables = loading.init_model(config, config.data.shape, jax.random.key(0))
  builder, spec = input_pipeline.open_dataset(dataset_dir)
  examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
  unit = spec.intensity(np.stack([e["volume"] for e in examples]))[..., 0]
  reports = [e["report"].decode() for e in examples]
  ids, mask = text_lib.load_tokenizer(config.text)(reports)
  text = np.asarray(model.apply(variables, ids, mask, method=model.encode_text))
  variables = align_image_projection(model, variables, unit, text)
  image = np.asarray(model.apply(variables, unit[..., None], method=model.encode_image))
  out = tmp_path_factory.mktemp("aligned_model")
  result = types.SimpleNamespace(
      config=config, model=model, variables=variables, unit_volumes=unit, image=image, text=text,
      study_ids=[e["study_id"].decode() for e in examples], reports=reports,
      source_paths=[e["source_path"].decode() for e in examples],
      raw_dir=os.path.join(os.path.dirname(dataset_dir), "raw"), dataset_dir=dataset_dir,
      released_path=write_released_checkpoint(out / "best_model.pt", variables),
      run_dir=write_our_checkpoint(str(out / "run"), config, variables, spec))
  _ALIGNED[key] = result
  return result


def run_launch(argv, capsys):
  """(exit code, stdout, stderr) of launch.main(argv), run in this process."""
  import launch  # pylint: disable=import-outside-toplevel
  code = launch.main(argv)
  out, err = capsys.readouterr()
  return code, out, err
