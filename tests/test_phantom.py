"""The phantom corpus: layout, determinism, HU realism, findings where the report says."""

import dataclasses
import os
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep import phantom
from data_prep import phantom_layouts
from data_prep import preprocess
from data_prep import schema
from data_prep import sources

SMALL = dict(size=48, slices=16)


def corpus_files(root):
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as file:
        out[os.path.relpath(path, root)] = file.read()
  return out


def test_corpus_has_the_bimcv_r_layout(tmp_path):
  phantom_layouts.write_phantom_corpus(str(tmp_path), n=8, seed=0, folders=4, **SMALL)
  table = pd.read_csv(tmp_path / "meta" / "curated_ct_report_path_En.csv", keep_default_na=False)
  assert list(table.columns) == ["path", "Report_en", "findings"]
  assert len(table) == 8
  assert sorted(os.listdir(tmp_path)) == ["CT1", "CT2", "CT3", "CT4", "meta"]
  for path in table["path"]:
    assert re.fullmatch(r"CT[1-4]/ct/sub-\d{5}_ct\.nii\.gz", path)
    assert (tmp_path / path).is_file()


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    phantom_layouts.write_phantom_corpus(str(tmp_path / name), n=5, seed=seed, folders=3, **SMALL)
  a, b, c = (corpus_files(tmp_path / name) for name in "abc")
  assert a == b
  assert a.keys() == c.keys() and any(a[k] != c[k] for k in a)


def test_volumes_are_int16_with_scanner_scaling_in_ras_and_lps(tmp_path):
  phantom_layouts.write_phantom_corpus(str(tmp_path), n=12, seed=1, folders=3, **SMALL)
  orientations, scalings = set(), set()
  for path in tmp_path.glob("CT*/ct/*.nii.gz"):
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16 and image.ndim == 3
    orientations.add("".join(nib.aff2axcodes(image.affine)))
    scalings.add((float(image.dataobj.slope), float(image.dataobj.inter)))
  assert orientations == {"RAS", "LPS"}
  assert len(scalings) >= 2 and any(inter != 0 for _, inter in scalings)


def test_realistic_geometry_has_scanner_spacing_and_varied_sizes():
  geometries = [phantom.sample_geometry(np.random.default_rng(i)) for i in range(200)]
  pixels = np.array([g.spacing[0] for g in geometries])
  slices = np.array([g.spacing[2] for g in geometries])
  assert pixels.min() >= 0.55 and pixels.max() <= 0.98
  assert slices.min() >= 1.0 and slices.max() <= 5.0 and slices.std() > 0.3
  assert len({g.shape for g in geometries}) > 50
  assert all(g.shape[0] in (448, 480, 512) for g in geometries)


def normal_chest(size=96, slices=32, seed=0):
  geometry = dataclasses.replace(
      phantom.sample_geometry(np.random.default_rng(seed), size, slices), noise_hu=0.0)
  return geometry, phantom.render_study(geometry, [], np.random.default_rng(seed))


def test_tissues_have_chest_ct_hu_values():
  _, (hu, chest) = normal_chest()
  def fraction(lo, hi):
    return np.mean((hu >= lo) & (hu <= hi))
  assert np.median(hu[0, 0, :]) == -1000                   # air outside the body
  lung = hu[chest.lungs["right"] | chest.lungs["left"]]
  assert -900 <= np.median(lung) <= -800
  assert fraction(-900, -800) > 0.1                         # lungs
  assert fraction(20, 60) > 0.1                             # soft tissue, heart, vessels
  assert fraction(-130, -70) > 0.01                         # fat
  assert fraction(400, 1000) > 0.002 and hu.max() <= 1000   # bone


def finding_centroid(finding, seed=0):
  """Centroid (mm, RAS) of the voxels a finding changes, and the chest it was drawn in."""
  geometry, (base, chest) = normal_chest(seed=seed)
  changed, _ = phantom.render_study(geometry, [finding], np.random.default_rng(seed))
  where = np.argwhere(changed != base)
  assert len(where) > 0
  mean = where.mean(axis=0)
  canvas = chest.canvas
  return np.array([np.interp(mean[0], np.arange(canvas.x.size), canvas.x),
                   np.interp(mean[1], np.arange(canvas.y.size), canvas.y),
                   np.interp(mean[2], np.arange(canvas.z.size), canvas.z)]), chest


def z_rel(chest, z):
  return (z - chest.lung_base) / (chest.lung_top - chest.lung_base)


@pytest.mark.parametrize("side,lobe", [("right", "upper lobe"), ("right", "middle lobe"),
                                       ("right", "lower lobe"), ("left", "upper lobe"),
                                       ("left", "lower lobe")])
def test_a_nodule_is_drawn_in_the_stated_side_and_lobe(side, lobe):
  (z0, z1), (y0, y1) = phantom._LOBE_BOX[(side, lobe)]  # pylint: disable=protected-access
  finding = phantom.Finding("nodule", side, lobe, "20 mm", 20.0,
                            center=(0.0, (y0 + y1) / 2, (z0 + z1) / 2))
  center, chest = finding_centroid(finding)
  assert np.sign(center[0]) == (1 if side == "right" else -1)   # RAS: +x is the patient's right
  assert z0 - 0.05 <= z_rel(chest, center[2]) <= z1 + 0.05
  anterior = (center[1] - chest.lung_center[side][1]) / chest.lung_radii[1]
  assert y0 - 0.1 <= anterior <= y1 + 0.1


@pytest.mark.parametrize("finding,check", [
    (phantom.Finding("pleural effusion", "left", "", "moderate"),
     lambda c, chest: c[0] < 0 and c[1] < chest.lung_center["left"][1]
     and z_rel(chest, c[2]) < 0.4),
    (phantom.Finding("adenopathy", "right", "hilar", "20 mm", 20.0),
     lambda c, chest: 0 < c[0] < chest.lung_center["right"][0]),
    (phantom.Finding("adenopathy", "", "mediastinal", "20 mm", 20.0),
     lambda c, chest: abs(c[0]) < 0.2 * chest.width),
    (phantom.Finding("emphysema", "right", "upper lobe", "moderate"),
     lambda c, chest: c[0] > 0 and z_rel(chest, c[2]) > 0.5),
    (phantom.Finding("cardiomegaly"),
     lambda c, chest: c[0] < 0 and c[1] > 0 and z_rel(chest, c[2]) < 0.5),
])
def test_other_findings_are_drawn_where_a_radiologist_expects_them(finding, check):
  center, chest = finding_centroid(finding, seed=2)
  assert check(center, chest), center


@pytest.mark.parametrize("finding", [
    phantom.Finding("nodule", "right", "upper lobe", "10 mm", 10.0, (0.0, 0.0, 0.75)),
    phantom.Finding("nodule", "left", "lower lobe", "10 mm", 10.0, (0.3, -0.4, 0.3)),
    phantom.Finding("mass", "left", "lower lobe", "32 mm", 32.0, (0.0, -0.4, 0.3)),
    phantom.Finding("consolidation", "right", "middle lobe", "patchy", 0, (0.0, 0.45, 0.42)),
    phantom.Finding("atelectasis", "left", "upper lobe", "", 0, (0.0, 0.1, 0.7)),
    phantom.Finding("pleural effusion", "right", "", "small"),
    phantom.Finding("adenopathy", "left", "hilar", "14 mm", 14.0),
    phantom.Finding("adenopathy", "", "mediastinal", "14 mm", 14.0),
    phantom.Finding("emphysema", "right", "upper lobe", "mild"),
    phantom.Finding("cardiomegaly"),
], ids=lambda f: f.label())
def test_the_smallest_findings_stay_visible_at_64x64x32(finding):
  params = schema.PreprocessParams(shape=(64, 64, 32))
  for seed in range(2):
    geometry = phantom.sample_geometry(np.random.default_rng(seed), 128, 40)
    volumes = []
    for findings in ([], [finding]):
      hu, _ = phantom.render_study(geometry, findings, np.random.default_rng(7))
      source = sources.SourceVolume(raw=hu, slope=1.0, inter=0.0,
                                       affine=phantom.canonical_affine(geometry))
      volumes.append(preprocess.preprocess(source, params)[0].astype(int))
    difference = np.abs(volumes[1] - volumes[0])
    assert difference.max() >= 15 and (difference >= 10).sum() >= 4


def sentences(report):
  text = report.replace("FINDINGS:", ".").replace("IMPRESSION:", ".")
  return [s.strip() for s in text.split(".") if s.strip()]


def is_negated(sentence):
  return sentence.startswith(tuple(p.strip() for p in phantom.NEGATION_PREFIXES))


def test_reports_state_every_finding_and_negate_only_absent_ones():
  for index in range(300):
    study, _ = phantom.make_study(5, index, 10, 300)
    said = sentences(study.report)
    positive = [s.lower() for s in said if not is_negated(s)]
    assert not any(" no " in f" {s} " for s in positive), study.report
    for finding in study.findings:
      stated = [s for s in positive if finding.name in s]
      assert stated, (finding, study.report)
      for detail in (finding.side, finding.location, finding.size):
        if detail and not (finding.name == "emphysema" and detail == "bilateral"):
          assert any(detail.split(" ")[0] in s for s in stated), (detail, study.report)
    present = {f.name for f in study.findings}
    for name in set(phantom.FINDINGS) - present:
      assert all(is_negated(s) for s in said if name in s.lower()), (name, study.report)


def test_findings_column_round_trips_and_studies_are_distinguishable():
  labels = []
  for index in range(300):
    study, _ = phantom.make_study(6, index, 10, 300)
    label = ";".join(f.label() for f in study.findings)
    parsed = phantom.parse_findings(label)
    assert [(f.name, f.side, f.location, f.size) for f in parsed] == [
        (f.name, f.side, f.location, f.size) for f in study.findings]
    labels.append(label)
  with_findings = [label for label in labels if label]
  assert 0.8 < len(with_findings) / len(labels) < 0.97
  assert len(set(with_findings)) > 0.85 * len(with_findings)
  counts = {name: sum(name in label for label in labels) for name in phantom.FINDINGS}
  assert min(counts.values()) >= 20, counts


def test_cli_writes_a_corpus_and_rejects_bad_counts(tmp_path, capsys):
  import launch  # pylint: disable=g-import-not-at-top
  assert launch.main(["phantom", "--out", str(tmp_path), "--n", "3", "--folders", "3",
                      "--size", "32", "--slices", "12", "--seed", "2"]) == 0
  assert len(list(tmp_path.glob("CT*/ct/*.nii.gz"))) == 3
  assert launch.main(["phantom", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
  assert "need n >= 1" in capsys.readouterr().err
