"""Raw CT + report corpus -> TFRecord shards (and the synthetic phantom corpus).

schema.py      the record schema and the dataset spec (preprocessing, intensity), one place
corpus.py      CSV reading, volume matching, row checks, split assignment
preprocess.py  NIfTI -> fixed-shape volume (`ct` and `released` modes)
resample.py    separable sparse-weight resampling (linear with antialiasing, area)
convert.py     parallel, resumable conversion with a report (`launch.py convert`)
phantom.py     synthetic chest-CT corpus in the BIMCV-R layout (`launch.py phantom`)
"""
