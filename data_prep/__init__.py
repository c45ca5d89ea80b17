"""Raw CT + report corpus -> TFRecord shards (and the synthetic phantom corpus).

Each module imports only those listed above it:
filesystem.py       paths on local disks or Beam's file systems (gs://, s3://, ...): the corpus
                    read, the output written
schema.py           the record schema and the dataset spec (preprocessing, intensity), one place
resample.py         separable sparse-weight resampling (linear with antialiasing, area)
corpus_base.py      Corpus/Study/Skipped, CorpusError, the checked CSV reader, file checks
corpus_bimcv.py     BIMCV-R (and DICOM-folder) CSVs: volume matching, row checks, splits
corpus_ctrate.py    CT-RATE's layout: its CSVs, metadata, labels, patient splits
corpus.py           the layout choice (`read_corpus`, `detect_layout`)
sources.py          SourceVolume, BadVolume, the shared source checks, the NIfTI reader
dicom.py            a DICOM series folder -> SourceVolume
preprocess.py       the reader choice (`load_source`); source -> record volume (`ct`, `released`)
convert.py          parallel, resumable conversion with a report (`launch.py convert`)
beam_convert.py     the same conversion as an Apache Beam pipeline (--beam_pipeline_options)
phantom.py          synthetic chest-CT studies: findings, volume, report
phantom_layouts.py  them as a corpus in the BIMCV-R, DICOM or CT-RATE layout (`launch.py phantom`)
"""
