"""The released PyTorch code's behaviour (main_ddp.py), as a reference setting.

Reproduces what that code actually trains (docs/released_code.md): one augmented view
(rotation/zoom/noise with p 0.5), no fusion, no view MSE (it is always 0 there), the `released`
loss (text->image cross-entropy only, no L2 normalization, fixed temperature 0.07, negatives only
within each device's batch of 4), `released` preprocessing (per-volume min-max, foreground crop, pad,
area resize to 224x224x96, no reorientation), the `rows` split (first 70% of CSV rows train, next
10% val), BioBERT lowercased as HF's default tokenizer did, AdamW lr 1e-4 / wd 0.01, cosine over
20 epochs, best checkpoint by val text->image R@10. Evaluation here is deterministic (the
released code drew a random 100-word window of each report even at validation).

Run:
  python launch.py convert --config configs/released_code.py --data_root /data/BIMCV-R \
      --output_dir /data/bimcv_released_tfrecords
  python launch.py train --config configs/released_code.py --data_root /data/bimcv_released_tfrecords \
      --output_dir runs/released_code --config.text.model_path /models/biobert_v1.1 --use_amp
"""

import medfinder_resnet50


def get_config(arg=None):
  c = medfinder_resnet50.get_config(arg)
  c.data.preprocess = "released"
  c.data.split_by = "rows"
  c.augment.two_views = False
  c.model.fusion.enabled = False
  c.loss.contrastive = "released"
  c.loss.mse_weight = 0.0
  c.loss.learn_temperature = False
  c.text.lowercase = "true"
  return c
