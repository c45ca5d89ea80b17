"""MedFinder-JAX: 3D CT text-image retrieval (BIMCV-R / MedFinder) in JAX/Flax.

The data path, each module below using only those above it (data_prep/ comes first: corpus ->
preprocessing -> records):

  input_pipeline.py   converted TFRecords -> per-process tf.data -> global jax.Arrays
  sharding.py         the mesh (data x fsdp x spatial), partition rules, batch and activation
                      placement (volumes split over devices), replication, gathers
  models/, losses.py, augment.py   pure JAX: the towers, fusion, losses, augmentation
  train_step.py       the train state (trainable / frozen), optimizer and jitted step
  train.py            run setup, resume, validation, the loop (stopping.py, logging.py)
  checkpoint.py       orbax persistence of steps
  loading.py          a model from our checkpoints or the released code's files
  encode.py           a loaded model's encoders on a mesh
  evaluate.py         a split's embeddings + metrics in memory (metrics.py: the math)
  index.py            an index of embeddings on disk and exact search over it
  commands/           what each launch.py command does, with its files and output

Beside the path: errors.py (the user-error base), config_utils.py, distributed.py
(multi-process start-up), convert_weights.py (PyTorch/HF state dicts), text.py (tokenizer),
findings.py (negation-aware keyword relevance), interchange.py (embeddings.npz, metrics.json),
plots.py.
"""
