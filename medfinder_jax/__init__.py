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
  evaluate.py         a split's embeddings, labels, prompts + metrics in memory (the math:
                      metrics.py retrieval, whose passes over the score matrix run in
                      score_pass.py (JAX: meshes, accelerators) or score_pass_host.py (the
                      CPU's BLAS, no JAX); zeroshot.py classification, bootstrap.py CIs with
                      bootstrap_kernels.py, its compiled per-replicate passes)
  index.py            the archive index on disk (shards, removals) and exact search over it
  ann.py              approximate search over an index (faiss IVF-SQ8)
  commands/           what each launch.py command does, with its files and output
  serve.py            the search server (HTTP API + web/index.html) over a commands/search Session

Beside the path: errors.py (the user-error base), config_utils.py, distributed.py
(multi-process start-up), convert_weights.py (PyTorch/HF state dicts), text.py (tokenizer),
findings.py (negation-aware keyword relevance and mentions), thumbnails.py (study thumbnails),
interchange.py (embeddings.npz, metrics.json), plots.py.
"""
