"""MedFinder with the 3D ResNet50 image tower: the paper's design (BIMCV-R, MICCAI 2024).

Reproduces: two augmented views per study, cross-attention fusion of the views, view-consistency
MSE + alpha * contrastive (symmetric CLIP loss over the global batch, learnable temperature),
BioBERT v1.1 text tower (frozen), `ct` preprocessing (RAS, 1.5x1.5x3 mm, HU window) at
224x224x96, the paper's folder split (7/1/2), the released code's optimizer settings (AdamW lr 1e-4,
wd 0.01, cosine, 20 epochs, 4 volumes per device).

Run (BioBERT: a local HF folder, see README):
  python launch.py convert --data_root /data/BIMCV-R --output_dir /data/bimcv_tfrecords
  python launch.py train --config configs/medfinder_resnet50.py \
      --data_root /data/bimcv_tfrecords --output_dir runs/resnet50 \
      --config.text.model_path /models/biobert_v1.1 --use_amp
"""

import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model.backbone = "resnet50"
  c.text.model_path = ""  # required: your local BioBERT v1.1 folder (--config.text.model_path)
  return c
