"""CT-RATE's evaluation protocols, as the systems compared on CT-RATE report them (CT-CLIP and
those that follow its scripts: Merlin, fVLM, HLIP, SPECTRE).

  python launch.py eval --config configs/eval_ctrate.py --model_path RUN --split test \\
      --config.data.tfrecord_dir /data/ctrate_ctclip --output_dir eval_ctrate

What matches the published protocol, and where a choice is stated:
- Split: CT-RATE's `valid` folder, our `test` split (the field's evaluation set); zero-shot
  operating points come from our `val` split, carved from `train` by patient, never from `test`.
- Zero-shot: the 18 labels of the records (multi_abnormality_labels), CT-CLIP's prompt pair
  "{label} is present." / "{label} is not present.", P(present) = softmax over the pair scaled by
  the model's temperature; AUROC per label and macro, with F1/accuracy/sensitivity/specificity at
  Youden's J (CT-CLIP picks the point on the evaluated split itself; here it comes from `val`;
  set eval.zeroshot.threshold_split="" to reproduce that optimistic choice).
- Report -> volume: R@5, 10, 50, 100 (CT-CLIP's report_to_volume: every volume is a gallery item
  and every report a query, so reconstructions of one scan with the same report are separate
  items: eval.gallery="volume"; "scan" merges them, see README "Comparing with other systems").
- Volume -> volume: K = 1, 5, 10, 50. CT-CLIP's volume_to_volume script averages the Jaccard
  index of the label sets over the top K and calls it MAP@K: that number is our Jaccard@K, with
  its gallery (volumes with at least one positive label, the query included):
  volume_retrieval.gallery="with_findings", exclude_self=False. Our P@K and MAP@K (binary
  relevance: shares a positive label) are reported beside it.
"""

import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.eval.split = "test"
  c.eval.recall_ks = (5, 10, 50, 100)
  c.eval.gallery = "volume"
  c.eval.keywords = ()
  c.eval.volume_retrieval.ks = (1, 5, 10, 50)
  c.eval.volume_retrieval.gallery = "with_findings"
  c.eval.volume_retrieval.exclude_self = False
  c.eval.zeroshot.enabled = True
  c.eval.zeroshot.templates = (("{label} is present.", "{label} is not present."),)
  c.eval.zeroshot.findings = ()          # the records' 18 labels, not report-derived findings
  c.eval.zeroshot.threshold_split = "val"
  return c
