"""Default MedFinder-JAX configuration: the paper's design at the released code's settings.

Every other file in configs/ starts from this one and overrides only what differs.
Run with:  python launch.py train --config configs/default.py --config.train.epochs=5

`get_config("tiny")` (`--config configs/default.py:tiny`, and `:tiny` on any config built from
this one) shrinks the model to what the tests and the CPU benchmarks run: 16x16x8 volumes, a
4-to-16-channel one-block-per-stage ResNet, the packaged all-MiniLM-L6-v2, 32-d embeddings,
one volume per device.
"""

import ml_collections


def get_config(arg=None):
  """Returns the default config; arg "tiny" gives the tests' CPU-sized model (module doc)."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/default.py: unknown config argument {arg!r}; expected 'tiny' "
                     f"or none")
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.output_dir = "output"

  # --- Raw corpus -> TFRecords (data_prep/) ------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_root = ""              # BIMCV-R layout: CT*/ct/*.nii.gz and meta/*.csv
  c.data.layout = "auto"             # "auto" (detect, and say which) | "bimcv" | "ctrate" | "dicom"
  c.data.val_fraction = 0.1          # ctrate: train patients carved out as val (by patient)
  c.data.ctrate_report_columns = ("Findings_EN", "Impressions_EN")  # ctrate: joined into the report
  c.data.csv = ""                    # "" = auto: meta/curated_ct_report_path_En.csv, else meta/BIMCV-R.csv
  c.data.csv_encoding = "utf-8"      # rows with bytes invalid in this encoding are skipped and reported
  c.data.path_column = "path"
  c.data.report_column = "Report_en"
  c.data.label_columns = ("findings",)  # kept in the records when present in the CSV
  c.data.split_by = "folders"        # "folders" (paper: 7/1/2 sorted CT folders) | "rows" (code: 70/10/20)
  c.data.preprocess = "ct"           # "ct" (RAS, spacing, HU window, body crop) | "released" (the released code)
  c.data.shape = (224, 224, 96)      # X, Y, Z voxels after preprocessing
  c.data.spacing = (1.5, 1.5, 3.0)   # mm per voxel to resample to (X, Y, Z); () = plain resize
  c.data.hu_window = (-1000.0, 1000.0)
  c.data.body_threshold_hu = -500.0  # ct mode: body crop = bounding box of voxels above this HU
  c.data.volume_dtype = "uint8"      # "uint8" ([0,1] * 255) | "int16" (HU)
  c.data.body_crop = True            # ct mode: crop to the body first (CT-CLIP's preset: False)
  c.data.fit = "shrink"              # ct mode, a body larger than shape: "shrink" | "crop" (centre)
  c.data.intensity_mapping = "unit"  # model input: "unit" (window -> [0,1]) | "hu/1000" (int16 only)
  c.data.tfrecord_dir = ""           # converted dataset (output of `launch.py convert`)
  c.data.workers = 1
  c.data.shard_size = 64             # studies per TFRecord shard
  c.data.min_shards = 4              # per split (if it has that many studies): one per reading process
  # Limits (skips beyond them name the flag; they do not change any record):
  c.data.max_volume_mib = 2048.0     # decoded voxels a header may declare; a worker peaks at ~1.6x
  c.data.max_field_chars = 1_000_000  # longest CSV field (a report); longer rows are skipped
  c.data.study_timeout_s = 600.0     # per study; a study still running is skipped, retry: true

  # --- Text ---------------------------------------------------------------------------------
  c.text = ml_collections.ConfigDict()
  c.text.model_path = ""             # local HF folder (BioBERT v1.1); "minilm" = packaged all-MiniLM-L6-v2
  c.text.max_tokens = 100
  c.text.window_words = 100          # random contiguous window of this many words while training
  c.text.trainable = False           # the released code freezes BERT
  c.text.pooling = "cls"             # "cls" (the released code) | "mean" (sentence-transformers models)
  c.text.lowercase = "auto"          # "auto" (tokenizer_config.json, else cased iff vocab.txt is) | "true" | "false"

  # --- Model ----------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet50"      # "resnet50" | "vit"
  c.model.embed_dim = 512
  c.model.dtype = "float32"          # compute dtype; "bfloat16" with fp32 master params
  c.model.remat = False              # rematerialize per ResNet stage / ViT block
  c.model.resnet = ml_collections.ConfigDict()
  c.model.resnet.layers = (3, 4, 6, 3)
  c.model.resnet.widths = (64, 128, 256, 512)
  c.model.resnet.conv1_kernel = 7
  c.model.resnet.conv1_stride = 1    # MONAI default, as in the released code
  c.model.resnet.conv_impl = "auto"  # "native" 3D convs | "decomposed" (fast on CPU) | "auto"
  c.model.vit = ml_collections.ConfigDict()
  c.model.vit.patch_size = 16
  c.model.vit.hidden_size = 768
  c.model.vit.mlp_dim = 3072
  c.model.vit.num_layers = 12
  c.model.vit.num_heads = 12
  c.model.vit.dropout_rate = 0.0     # MONAI ViT default
  c.model.fusion = ml_collections.ConfigDict()
  c.model.fusion.enabled = True
  c.model.fusion.num_heads = 8

  # --- Augmentation (on device) ---------------------------------------------------------------
  c.augment = ml_collections.ConfigDict()
  c.augment.two_views = True
  c.augment.rotate_max = 0.2         # radians, about each axis
  c.augment.zoom_range = (0.9, 1.1)
  c.augment.noise_std_max = 0.1      # std ~ U(0, noise_std_max)
  c.augment.prob = 0.5               # per transform, first view (seed: 0.5)
  c.augment.view_prob = 0.3          # per transform, second view (seed: 0.3)

  # --- Loss -----------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.contrastive = "clip"        # "clip" | "siglip" | "released"
  c.loss.alpha = 1.0
  c.loss.mse_weight = 1.0
  c.loss.temperature_init = 0.07     # clip: initial temperature; released: the fixed one
  c.loss.learn_temperature = True    # False: clip/siglip scale (and bias) stay at their init
  c.loss.max_logit_scale = 100.0     # clip: 1/temperature clipped to [1, 100] as in CLIP
  c.loss.siglip_logit_scale_init = 10.0   # SigLIP paper init: t = 10 ...
  c.loss.siglip_logit_bias_init = -10.0   # ... and b = -10
  c.loss.mse_normalize = True        # view MSE on L2-normalized embeddings (the retrieval space)

  # --- Mesh -----------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1 = all devices not used by other axes
  c.mesh.fsdp = 1                    # >1: large params and their optimizer state sharded
  c.mesh.fsdp_min_size = 2**18       # params with fewer elements stay replicated
  c.mesh.spatial = 1                 # >1: each volume split along X over this many devices

  # --- Training -------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size_per_device = 4  # per data x fsdp shard, per micro-batch (seed: 4 per GPU)
  c.train.epochs = 20
  c.train.lr = 1e-4
  c.train.weight_decay = 0.01
  c.train.warmup_steps = 0           # linear warmup, then cosine decay to 0 over all steps
  c.train.grad_accum_steps = 1       # micro-batches per optimizer step (global batch x this)
  c.train.shuffle_buffer = 256
  c.train.log_every_steps = 10       # metrics reach the host (and the JSONL) this often
  c.train.eval_every_steps = 0       # 0 = once per epoch
  c.train.checkpoint_every_steps = 0  # 0 = once per epoch
  c.train.keep_checkpoints = 3       # latest k kept (plus the best by val t2i R@10)
  c.train.max_minutes = 0.0          # > 0: stop (checkpoint saved) after this much training time
  c.train.max_steps = 0              # >0: stop after this many optimizer steps (else epochs)
  c.train.val_split = "val"          # split validated in the loop (best checkpoint selection)

  # --- Evaluation -----------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.split = "val"
  c.eval.batch_size_per_device = 4
  c.eval.keywords = ("atelectasis", "consolidation", "adenopathy")
  c.eval.keyword_topk = (20, 50, 100)
  c.eval.recall_ks = (1, 5, 10)      # R@K columns
  c.eval.bootstrap_samples = 1000    # resamples for confidence intervals; 0 = no CIs
  c.eval.ci_level = 0.95
  c.eval.ties = "mid"                # a pair tied with others: "mid" (expected under random
                                     # tie-breaking) | "best" | "worst" (see metrics.py)
  c.eval.rank_engine = "auto"        # who counts ranks: "jax" (a mesh, accelerators) | "host"
                                     # (the CPU's BLAS, no JAX) | "auto" (host unless JAX has
                                     # or would get an accelerator)
  c.eval.gallery = "volume"          # one gallery item per volume | "scan": the reconstructions
                                     # of a scan merged (records' scan_id), identical reports once
  c.eval.volume_retrieval = ml_collections.ConfigDict()   # volume -> volume (needs labels)
  c.eval.volume_retrieval.ks = (1, 5, 10, 50)   # P@K, MAP@K, Jaccard@K; () = off
  c.eval.volume_retrieval.exclude_self = True   # the query is not in its own gallery
  c.eval.volume_retrieval.gallery = "all"       # | "with_findings": volumes with a positive label
  c.eval.zeroshot = ml_collections.ConfigDict()   # zero-shot classification (zeroshot.py)
  c.eval.zeroshot.enabled = True
  c.eval.zeroshot.templates = (("{label}.", "No {label}."),)   # (positive, negative) pairs;
                                     # several = an ensemble averaged in embedding space
  c.eval.zeroshot.findings = ("nodule", "mass", "consolidation", "pleural effusion",
                              "atelectasis", "adenopathy", "emphysema", "cardiomegaly")
                                     # labels read from the reports (negation-aware) when the
                                     # records carry no label vector
  c.eval.zeroshot.threshold_split = "val"   # Youden's J operating points chosen on this split
  c.eval.search_top_k = 10           # launch.py search: results shown (--top_k)
  c.eval.excerpt_chars = 200         # launch.py search: report excerpt length per result

  # --- Logging --------------------------------------------------------------------------------
  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "disabled"          # "online" | "offline" | "disabled"
  c.wandb.project = "MedFinder"
  c.wandb.name = ""
  if arg == "tiny":
    shrink_to_tiny(c)
  return c


def shrink_to_tiny(c):
  """The tests' and the CPU benchmarks' model (seconds per step on 2 cores)."""
  c.data.shape = (16, 16, 8)
  c.data.spacing = ()
  c.text.model_path = "minilm"
  c.text.max_tokens = 32
  c.model.embed_dim = 32
  c.model.resnet.layers = (1, 1, 1, 1)
  c.model.resnet.widths = (4, 8, 8, 16)
  c.model.resnet.conv1_kernel = 3
  c.model.fusion.num_heads = 2
  c.train.batch_size_per_device = 1
  c.eval.batch_size_per_device = 1
