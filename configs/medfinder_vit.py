"""MedFinder with the 3D ViT image tower (16^3 patches, 768 wide, 12 layers, 12 heads).

Reproduces the paper's ViT variant (the released code's ViT branch could not run): same
training recipe as configs/medfinder_resnet50.py, ViT-B/16 in 3D over 224x224x96 volumes
(14x14x6 = 1176 patch tokens feed the cross-attention fusion).

Run:
  python launch.py train --config configs/medfinder_vit.py \
      --data_root /data/bimcv_tfrecords --output_dir runs/vit \
      --config.text.model_path /models/biobert_v1.1 --use_amp
"""

import medfinder_resnet50


def get_config(arg=None):
  c = medfinder_resnet50.get_config(arg)
  c.model.backbone = "vit"
  return c
