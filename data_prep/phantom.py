"""Synthetic chest-CT studies (demo, tests, benchmarks): each study's scanner geometry, anatomy,
findings and report, its HU volume, and the int16 NIfTI file of it (scl_slope/scl_inter, RAS or
LPS affine). data_prep/phantom_layouts.py writes them as a corpus in each layout
(`write_phantom_corpus`). Each study has 0-3 findings drawn into the volume at a stated side,
lobe and size, and an English report that states them and negates some absent ones.

Report vocabulary (what keyword retrieval can rely on):
- finding names: FINDINGS; sides: "right", "left" (+ "bilateral" for effusion and emphysema);
  lobes: "upper lobe", "middle lobe" (right only), "lower lobe"; adenopathy locations: "hilar"
  (right/left) and "mediastinal"; sizes: "<d> mm" (nodule, mass, adenopathy), "small" /
  "moderate" / "large" (effusion), "mild" / "moderate" / "severe" (emphysema), "patchy" / "lobar"
  (consolidation).
- every present finding appears in a positive sentence with its exact name (e.g. "pleural
  effusion", "adenopathy"); negated findings appear only in sentences that begin with "No " or
  "There is no " (NEGATION_PREFIXES), e.g. "No pleural effusion.", "No pulmonary nodules or
  masses.", "No mediastinal or hilar adenopathy.". Positive sentences never contain " no ".
- a corpus CSV's `findings` column lists the present findings as `name|side|location|size`
  joined by ";" (empty fields allowed, empty string when normal), e.g.
  "nodule|right|upper lobe|14 mm;pleural effusion|left||small" (Finding.label, parse_findings).
"""

import dataclasses
import gzip

import nibabel as nib
import numpy as np

FINDINGS = ("nodule", "mass", "consolidation", "pleural effusion", "atelectasis", "adenopathy",
            "emphysema", "cardiomegaly")
FINDING_WEIGHTS = (1.4, 0.8, 1.0, 1.0, 1.0, 1.0, 0.8, 0.7)
LOBES = {"right": ("upper lobe", "middle lobe", "lower lobe"), "left": ("upper lobe", "lower lobe")}
NEGATION_PREFIXES = ("No ", "There is no ")

# HU of the tissues (issue: air -1000, lung about -850, fat about -100, soft tissue 20-60,
# bone 400-1000).
AIR, LUNG, FAT, MUSCLE, BLOOD, BONE_CORTEX, BONE_MARROW = -1000, -850, -100, 45, 40, 900, 400
FLUID, SOLID = 10, 35

# Lobe boxes in lung-relative coordinates: z 0 = lung base, 1 = apex; y -1 = posterior, +1 =
# anterior edge of the lung; x 0 = lung center, +1 lateral edge.
_LOBE_BOX = {
    ("right", "upper lobe"): ((0.62, 0.85), (-0.45, 0.5)),
    ("right", "middle lobe"): ((0.33, 0.5), (0.25, 0.65)),
    ("right", "lower lobe"): ((0.15, 0.4), (-0.65, -0.15)),
    ("left", "upper lobe"): ((0.55, 0.85), (-0.3, 0.55)),
    ("left", "lower lobe"): ((0.15, 0.4), (-0.65, -0.15)),
}


@dataclasses.dataclass
class Finding:
  """One finding: what the report states (name, side, location, size) and where it is drawn."""
  name: str
  side: str = ""
  location: str = ""
  size: str = ""
  size_mm: float = 0.0
  center: tuple = (0.0, 0.0, 0.0)    # lung-relative (x, y, z) of the drawing, see _LOBE_BOX

  def label(self):
    return "|".join((self.name, self.side, self.location, self.size))


@dataclasses.dataclass
class StudyGeometry:
  """Voxel grid and storage of one phantom volume (canonical RAS array, mm)."""
  shape: tuple            # (nx, ny, nz) voxels
  spacing: tuple          # mm
  orientation: str        # "RAS" or "LPS": axis codes of the stored file
  slope: float
  inter: float
  noise_hu: float
  body_width: float       # mm, left-right
  body_depth: float       # mm, anterior-posterior


def sample_geometry(rng, size=512, slices=100):
  """Scanner geometry; `size`/`slices` are the nominal matrix and slice count (512/100 is
  realistic: in-plane 0.55-0.98 mm, slices 2-4.5 mm); smaller values give coarser voxels over
  the same anatomy."""
  scale = 512.0 / size
  nx, ny = (int(round(size * rng.choice([1.0, 1.0, 0.9375, 0.875]))) for _ in range(2))
  nz = max(8, int(round(slices * rng.uniform(0.75, 1.3))))
  pixel = rng.uniform(0.55, 0.98) * scale
  z_extent = rng.uniform(260.0, 340.0)
  width = min(nx, ny) * pixel * rng.uniform(0.78, 0.9)
  slope, inter = [(1.0, -1024.0), (1.0, -1000.0), (0.5, -1024.0), (1.0, 0.0)][rng.integers(4)]
  return StudyGeometry(shape=(nx, ny, nz), spacing=(pixel, pixel, z_extent / nz),
                       orientation=str(rng.choice(["RAS", "LPS"])), slope=slope, inter=inter,
                       noise_hu=float(rng.uniform(8.0, 25.0)), body_width=width,
                       body_depth=width * rng.uniform(0.62, 0.74))


def sample_findings(rng):
  """0-3 distinct findings with side, location and size."""
  count = rng.choice(4, p=[0.1, 0.35, 0.35, 0.2])
  weights = np.asarray(FINDING_WEIGHTS) / np.sum(FINDING_WEIGHTS)
  names = rng.choice(FINDINGS, size=count, replace=False, p=weights)
  order = {name: i for i, name in enumerate(FINDINGS)}
  return [_sample_finding(rng, str(name)) for name in sorted(names, key=order.get)]


def _sample_finding(rng, name):
  side = str(rng.choice(["right", "left"]))
  if name in ("nodule", "mass", "consolidation", "atelectasis"):
    lobe = str(rng.choice(LOBES[side]))
    (z0, z1), (y0, y1) = _LOBE_BOX[(side, lobe)]
    center = (rng.uniform(-0.35, 0.35), rng.uniform(y0, y1), rng.uniform(z0, z1))
    finding = Finding(name, side, lobe, center=center)
    if name in ("nodule", "mass"):
      finding.size_mm = float(rng.integers(10, 31) if name == "nodule" else rng.integers(32, 66))
      finding.size = f"{finding.size_mm:.0f} mm"
    elif name == "consolidation":
      finding.size = str(rng.choice(["patchy", "lobar"]))
    return finding
  if name == "pleural effusion":
    side = str(rng.choice(["right", "left", "bilateral"]))
    return Finding(name, side, "", str(rng.choice(["small", "moderate", "large"])))
  if name == "emphysema":
    side = str(rng.choice(["bilateral", "bilateral", "right", "left"]))
    return Finding(name, side, "upper lobe", str(rng.choice(["mild", "moderate", "severe"])))
  if name == "adenopathy":
    location = str(rng.choice(["hilar", "hilar", "mediastinal"]))
    size_mm = float(rng.integers(14, 31))
    return Finding(name, side if location == "hilar" else "", location, f"{size_mm:.0f} mm",
                   size_mm=size_mm)
  return Finding(name)  # cardiomegaly


# --- Volume -------------------------------------------------------------------------------------

class _Canvas:
  """A canonical RAS HU volume with mm coordinates of every axis (x: +right, y: +anterior)."""

  def __init__(self, geometry):
    self.geometry = geometry
    nx, ny, nz = geometry.shape
    sx, sy, sz = geometry.spacing
    self.x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)
    self.y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)
    self.z = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(np.float32)
    self.hu = np.full(geometry.shape, AIR, dtype=np.float32)

  def box(self, center, radii):
    """Index slices covering center +- radii (mm), clipped to the volume."""
    out = []
    for axis_mm, c, r in zip((self.x, self.y, self.z), center, radii):
      step = float(axis_mm[1] - axis_mm[0])
      lo = int(np.floor((c - r - axis_mm[0]) / step))
      hi = int(np.ceil((c + r - axis_mm[0]) / step)) + 1
      out.append(slice(max(lo, 0), max(min(hi, axis_mm.size), 0)))
    return tuple(out)

  def ellipsoid(self, center, radii, value, within=None):
    """Sets voxels inside the ellipsoid to `value` (optionally only where `within` is true)."""
    box = self.box(center, radii)
    q = (((self.x[box[0]] - center[0]) / radii[0])[:, None, None] ** 2
         + ((self.y[box[1]] - center[1]) / radii[1])[None, :, None] ** 2
         + ((self.z[box[2]] - center[2]) / radii[2])[None, None, :] ** 2)
    mask = q <= 1.0
    if within is not None:
      mask &= within[box]
    self.hu[box][mask] = value
    return box, mask


class _Chest:
  """Anatomy of one study: body, ribs, spine, lungs, heart, vessels, airway, mediastinum."""

  def __init__(self, canvas, rng):
    g = canvas.geometry
    self.canvas = canvas
    self.width, self.depth = g.body_width, g.body_depth
    height = canvas.z[-1] - canvas.z[0]
    self.lung_base = canvas.z[0] + height * rng.uniform(0.08, 0.14)
    self.lung_top = canvas.z[-1] - height * rng.uniform(0.04, 0.1)
    self.rib_pitch = rng.uniform(22.0, 28.0)
    self.rib_phase = rng.uniform(0.0, self.rib_pitch)
    self.enlarged_heart_scale = float(rng.uniform(1.3, 1.45))
    self.heart_scale = 1.0
    self.lung_center = {side: (sign * 0.255 * self.width, -0.03 * self.depth)
                        for side, sign in (("right", 1.0), ("left", -1.0))}
    self.lung_radii = (0.2 * self.width, 0.37 * self.depth)
    self.lungs = {}

  def lung_point(self, side, rel):
    """mm coordinates of a lung-relative point (x lateral +1, y anterior +1, z apex 1)."""
    cx, cy = self.lung_center[side]
    ax, ay = self.lung_radii
    sign = 1.0 if side == "right" else -1.0
    z = self.lung_base + rel[2] * (self.lung_top - self.lung_base)
    return (cx + sign * rel[0] * ax, cy + rel[1] * ay, z)

  def lung_z_rel(self):
    return (self.canvas.z - self.lung_base) / (self.lung_top - self.lung_base)

  def draw_body(self):
    c = self.canvas
    q = ((c.x / (self.width / 2))[:, None] ** 2 + (c.y / (self.depth / 2))[None, :] ** 2)
    c.hu[q <= 1.0] = FAT
    c.hu[q <= 0.87] = MUSCLE
    rib_ring = (q >= 0.7) & (q <= 0.76) & ~((np.abs(c.x)[:, None] < 0.08 * self.width)
                                            & (c.y[None, :] > 0))
    pitch = self.rib_pitch
    ribs_z = (np.mod(c.z - self.rib_phase, pitch) < 0.4 * pitch)
    ribs_z &= (c.z > self.lung_base - 10) & (c.z < self.lung_top + 5)
    c.hu[rib_ring[:, :, None] & ribs_z[None, None, :]] = BONE_CORTEX - 150
    self._draw_column((0.0, -0.36 * self.depth), 0.085 * self.width, BONE_MARROW, BONE_CORTEX)
    self._draw_column((0.0, -0.46 * self.depth + 0.02 * self.width), 0.03 * self.width, 20, None)
    sternum = (0.0, 0.41 * self.depth)
    self.canvas.ellipsoid((*sternum, 0.5 * (self.lung_base + self.lung_top)),
                          (0.05 * self.width, 0.025 * self.depth,
                           0.45 * (self.lung_top - self.lung_base)), BONE_MARROW + 150)

  def _draw_column(self, center_xy, radius, value, rim_value):
    c = self.canvas
    r2 = ((c.x - center_xy[0])[:, None] ** 2 + (c.y - center_xy[1])[None, :] ** 2) / radius ** 2
    if rim_value is not None:
      c.hu[r2 <= 1.0] = rim_value
      c.hu[r2 <= 0.7] = value
    else:
      c.hu[r2 <= 1.0] = value

  def draw_lungs(self):
    c = self.canvas
    z_rel = self.lung_z_rel()
    profile = np.sqrt(np.clip((1.0 - z_rel) / 0.45, 0.0, 1.0)) * (
        0.82 + 0.18 * np.clip(z_rel / 0.2, 0.0, 1.0))
    profile[(z_rel < 0) | (z_rel > 1)] = 0.0
    ax, ay = self.lung_radii
    gravity = np.float32(40.0) * (-c.y / (self.depth / 2))   # dependent lung is denser
    for side in ("right", "left"):
      cx, cy = self.lung_center[side]
      q = ((c.x - cx) / ax)[:, None] ** 2 + ((c.y - cy) / ay)[None, :] ** 2
      mask = (q[:, :, None] <= profile[None, None, :] ** 2)
      mask &= z_rel[None, None, :] > 0.14 * (1.0 - q[:, :, None])       # diaphragm dome
      self.lungs[side] = mask
      c.hu[mask] = np.broadcast_to(LUNG + gravity[None, :, None], mask.shape)[mask]

  def draw_mediastinum(self):
    c = self.canvas
    span = self.lung_top - self.lung_base
    mid = self.lung_base + 0.7 * span
    c.ellipsoid((0.0, 0.02 * self.depth, mid), (0.1 * self.width, 0.3 * self.depth, 0.3 * span),
                FAT)
    c.ellipsoid((-0.07 * self.width, -0.2 * self.depth, self.lung_base + 0.45 * span),
                (0.045 * self.width, 0.045 * self.width, 0.5 * span), BLOOD)
    c.ellipsoid((0.0, -0.1 * self.depth, self.lung_top),
                (0.035 * self.width, 0.035 * self.width, 0.45 * span), AIR)
    heart = (-0.07 * self.width, 0.12 * self.depth, self.lung_base + 0.28 * span)
    radii = np.asarray((0.17 * self.width, 0.22 * self.depth, 0.2 * span)) * self.heart_scale
    c.ellipsoid((heart[0] - 0.3 * (self.heart_scale - 1) * radii[0], *heart[1:]), radii, BLOOD)


def _draw_finding(chest, finding, rng):
  c = chest.canvas
  if finding.name in ("nodule", "mass"):
    center = chest.lung_point(finding.side, finding.center)
    radius = finding.size_mm / 2
    if finding.name == "nodule":
      c.ellipsoid(center, (radius,) * 3, SOLID)
      return
    for _ in range(3):   # lobulated mass
      offset = rng.normal(0.0, 0.25 * radius, size=3)
      c.ellipsoid(tuple(np.add(center, offset)), (0.75 * radius,) * 3, SOLID + 5)
  elif finding.name == "consolidation":
    center = chest.lung_point(finding.side, finding.center)
    span = chest.lung_top - chest.lung_base
    scale = 1.0 if finding.size == "lobar" else 0.6
    radii = np.asarray((0.55 * chest.lung_radii[0], 0.45 * chest.lung_radii[1], 0.2 * span))
    c.ellipsoid(center, radii * scale, float(rng.uniform(-40, 20)),
                within=chest.lungs[finding.side])
  elif finding.name == "atelectasis":
    center = chest.lung_point(finding.side, finding.center)
    c.ellipsoid(center, (0.45 * chest.lung_radii[0], 0.35 * chest.lung_radii[1],
                         rng.uniform(4.0, 7.0)), SOLID, within=chest.lungs[finding.side])
  elif finding.name == "pleural effusion":
    _draw_effusion(chest, finding)
  elif finding.name == "adenopathy":
    _draw_node(chest, finding)
  elif finding.name == "emphysema":
    _draw_emphysema(chest, finding, rng)


def _draw_effusion(chest, finding):
  """Fluid layering in the posterior (dependent) base of the hemithorax (patient supine)."""
  c = chest.canvas
  depth, reach = {"small": (0.35, 0.3), "moderate": (0.6, 0.45), "large": (0.9, 0.6)}[finding.size]
  z_rel = chest.lung_z_rel()
  height = depth * np.sqrt(np.clip(1.0 - z_rel / reach, 0.0, 1.0))    # in units of lung depth
  sides = ("right", "left") if finding.side == "bilateral" else (finding.side,)
  for side in sides:
    cy = chest.lung_center[side][1]
    y_rel = (c.y - cy) / chest.lung_radii[1]
    fluid = (y_rel[None, :, None] < -1.0 + 2.0 * height[None, None, :]) & chest.lungs[side]
    c.hu[fluid] = FLUID


def _draw_node(chest, finding):
  c = chest.canvas
  span = chest.lung_top - chest.lung_base
  radius = finding.size_mm / 2
  if finding.location == "hilar":
    center = chest.lung_point(finding.side, (-0.85, 0.0, 0.5))
  else:
    center = (0.1 * chest.width, -0.06 * chest.depth, chest.lung_base + 0.72 * span)
  c.ellipsoid(center, (radius, radius, 1.3 * radius), SOLID + 10)


def _draw_emphysema(chest, finding, rng):
  """Lower attenuation and bullae in the upper lungs."""
  c = chest.canvas
  drop, bullae = {"mild": (70.0, 2), "moderate": (100.0, 4), "severe": (125.0, 7)}[finding.size]
  z_rel = chest.lung_z_rel()
  weight = np.clip((z_rel - 0.35) / 0.3, 0.0, 1.0).astype(np.float32)
  sides = ("right", "left") if finding.side == "bilateral" else (finding.side,)
  for side in sides:
    lung = chest.lungs[side]
    c.hu[lung] -= np.broadcast_to(np.float32(drop) * weight[None, None, :], lung.shape)[lung]
    for _ in range(bullae):
      rel = (rng.uniform(-0.5, 0.6), rng.uniform(-0.5, 0.5), rng.uniform(0.6, 0.9))
      c.ellipsoid(chest.lung_point(side, rel), (rng.uniform(6.0, 14.0),) * 3, AIR + 20,
                  within=lung)


def render_study(geometry, findings, rng):
  """(HU volume, anatomy): canonical RAS float32 chest with `findings` drawn in, plus noise.

  The anatomy takes its random numbers before any finding, so the same RNG state gives the
  same chest with or without findings."""
  canvas = _Canvas(geometry)
  chest = _Chest(canvas, rng)
  if any(f.name == "cardiomegaly" for f in findings):
    chest.heart_scale = chest.enlarged_heart_scale
  chest.draw_body()
  chest.draw_lungs()
  chest.draw_mediastinum()
  for finding in findings:
    _draw_finding(chest, finding, rng)
  if geometry.noise_hu > 0:
    noise = rng.standard_normal(geometry.shape, dtype=np.float32)
    canvas.hu += noise * np.float32(geometry.noise_hu)
  return canvas.hu, chest


def canonical_affine(geometry):
  """Voxel -> RAS mm of the canonical array (center of the volume at the origin)."""
  affine = np.diag([*geometry.spacing, 1.0])
  affine[:3, 3] = -(np.asarray(geometry.shape) - 1) / 2 * np.asarray(geometry.spacing)
  return affine


def stored_volume(hu, geometry, slope=None, inter=None):
  """(raw int16 in the file's voxel order, RAS affine) of a canonical HU volume: the
  geometry's orientation (LPS = first two axes flipped), HU = raw * slope + inter (the
  geometry's scaling unless given). The one source of every layout's voxels."""
  slope = geometry.slope if slope is None else slope
  inter = geometry.inter if inter is None else inter
  affine = canonical_affine(geometry)
  target = nib.orientations.axcodes2ornt(tuple(geometry.orientation))
  transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), target)
  data = nib.orientations.apply_orientation(hu, transform)
  affine = affine @ nib.orientations.inv_ornt_aff(transform, hu.shape)
  raw = np.clip(np.rint((data - inter) / slope), -32768, 32767).astype(np.int16)
  return raw, affine


def write_nifti(path, hu, geometry):
  """Stores a canonical HU volume as int16 NIfTI with scl_slope/scl_inter and the geometry's
  orientation (LPS = first two axes flipped). Byte-identical for identical input (gzip mtime 0).
  """
  raw, affine = stored_volume(hu, geometry)
  write_raw_nifti(path, raw, affine, geometry.slope, geometry.inter)


def write_raw_nifti(path, raw, affine, slope=1.0, inter=0.0):
  """int16 `raw` as a NIfTI file with this affine and scaling; byte-identical per input."""
  header = nib.Nifti1Header()
  header.set_data_dtype(np.int16)
  header.set_data_shape(raw.shape)
  header.set_qform(affine, code=1)
  header.set_sform(affine, code=1)
  header.set_xyzt_units("mm")
  header.set_slope_inter(slope, inter)
  with open(path, "wb") as file, gzip.GzipFile(fileobj=file, mode="wb", compresslevel=1,
                                               mtime=0, filename="") as stream:
    header.write_to(stream)
    stream.write(b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr - 4))
    stream.write(raw.tobytes(order="F"))


# --- Report -------------------------------------------------------------------------------------

def _positive_sentence(finding, rng):
  f = finding
  if f.name == "nodule":
    return str(rng.choice([f"A {f.size} solid nodule is seen in the {f.side} {f.location}.",
                           f"There is a {f.size} pulmonary nodule in the {f.side} {f.location}."]))
  if f.name == "mass":
    return f"A {f.size} mass is present in the {f.side} {f.location}, suspicious for malignancy."
  if f.name == "consolidation":
    return f"{f.size.capitalize()} consolidation in the {f.side} {f.location}."
  if f.name == "atelectasis":
    return str(rng.choice([f"Subsegmental atelectasis in the {f.side} {f.location}.",
                           f"Linear atelectasis is noted in the {f.side} {f.location}."]))
  if f.name == "pleural effusion":
    if f.side == "bilateral":
      return f"{f.size.capitalize()} bilateral pleural effusions."
    return f"{f.size.capitalize()} {f.side} pleural effusion."
  if f.name == "adenopathy":
    if f.location == "hilar":
      return f"{f.side.capitalize()} hilar adenopathy, with a lymph node measuring {f.size}."
    return f"Mediastinal adenopathy, with a right paratracheal lymph node measuring {f.size}."
  if f.name == "emphysema":
    where = "in both upper lobes" if f.side == "bilateral" else f"in the {f.side} upper lobe"
    return f"{f.size.capitalize()} centrilobular emphysema, predominantly {where}."
  return str(rng.choice(["Cardiomegaly.", "The heart is enlarged, consistent with cardiomegaly."]))


def _impression(finding):
  f = finding
  if f.name in ("nodule", "mass"):
    return f"{f.side.capitalize()} {f.location} {f.name} ({f.size})."
  if f.name in ("consolidation", "atelectasis"):
    return f"{f.side.capitalize()} {f.location} {f.name}."
  if f.name == "pleural effusion":
    side = "bilateral pleural effusions" if f.side == "bilateral" else f"{f.side} pleural effusion"
    return f"{f.size.capitalize()} {side}."
  if f.name == "adenopathy":
    where = f"{f.side} hilar" if f.location == "hilar" else "mediastinal"
    return f"{where.capitalize()} adenopathy."
  if f.name == "emphysema":
    return f"{f.size.capitalize()} emphysema."
  return "Cardiomegaly."


_NEGATIONS = {
    "consolidation": ("No consolidation.", "There is no focal consolidation."),
    "pleural effusion": ("No pleural effusion.", "No evidence of pleural effusion."),
    "atelectasis": ("No atelectasis.",),
    "adenopathy": ("No mediastinal or hilar adenopathy.",),
    "emphysema": ("No emphysema.",),
    "cardiomegaly": ("No cardiomegaly.", "There is no cardiomegaly."),
}
_FILLERS = ("The trachea and central airways are patent.",
            "Degenerative changes of the thoracic spine.",
            "The visualized upper abdomen is unremarkable.",
            "The thyroid gland is unremarkable.",
            "Mild atherosclerotic calcification of the aorta.")


def write_report(findings, rng, negation_prob=0.7):
  """Radiology-style report: findings in anatomical order, some absent findings negated."""
  present = {f.name for f in findings}
  sentences = [_positive_sentence(f, rng) for f in findings]
  absent_focal = tuple(n for n in ("nodule", "mass") if n not in present)
  if absent_focal and rng.random() < negation_prob:
    sentences.insert(0, {("nodule", "mass"): "No pulmonary nodules or masses.",
                         ("nodule",): "No pulmonary nodules.",
                         ("mass",): "No pulmonary mass."}[absent_focal])
  for name, options in _NEGATIONS.items():
    if name not in present and rng.random() < negation_prob:
      sentences.append(str(rng.choice(options)))
  fillers = rng.choice(_FILLERS, size=rng.integers(0, 3), replace=False)
  sentences += [str(s) for s in fillers]
  impression = (" ".join(_impression(f) for f in findings) if findings
                else "No acute cardiopulmonary abnormality.")
  return ("CT chest without contrast. FINDINGS: " + " ".join(sentences)
          + " IMPRESSION: " + impression)


# --- Studies of a corpus ------------------------------------------------------------------------

@dataclasses.dataclass
class PhantomStudy:
  study_id: str
  folder: str
  findings: list
  report: str
  geometry: StudyGeometry


def folder_of(index, folders, n):
  """The CT folder of study `index` of n: CT1..CT<folders> in contiguous blocks."""
  return f"CT{1 + index * folders // n}"


def make_study(seed, index, folders, n, size=512, slices=100):
  """The index-th study of a corpus: its own RNG stream, so studies are independent of order."""
  rng = np.random.default_rng([seed, index])
  geometry = sample_geometry(rng, size, slices)
  findings = sample_findings(rng)
  report = write_report(findings, rng)
  folder = folder_of(index, folders, n)
  study = PhantomStudy(f"sub-{index:05d}_ct", folder, findings, report, geometry)
  return study, rng


def parse_findings(text):
  """The `findings` column back into Finding objects (name, side, location, size)."""
  out = []
  for item in filter(None, str(text).split(";")):
    name, side, location, size = item.split("|")
    out.append(Finding(name, side, location, size))
  return out
