"""Train/val splits of preprocessed cases from the phantom, a BraTS-format folder, or a TFDS dataset.

Whatever the source, cases are ordered by `case_id` (natural order) and split by a permutation drawn from `data_cfg.seed`, so
the same config always gives the same split, and the phantom source, the `brats_phantom` TFDS build and a
`write_brats_dir` folder of the same cases agree on which cases are validation.
"""
from __future__ import annotations

import json
import logging
import os
import re

import ml_collections
import numpy as np

from mri_poison import io_utils
from mri_poison.data.case import MODALITIES, Case, DataError
from mri_poison.data.grid import FOLDER_DEFAULTS  # noqa: F401  (the configs' real-data defaults)
from mri_poison.data.grid import fit_to_grid, folder_setting, pad_or_crop_checked, phantom_cases, shape_of

SOURCES = ("phantom", "brats", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults every study config starts from (CPU-sized; override shape/patch_shape for real runs)."""
  return ml_collections.ConfigDict(dict(
      source="phantom",  # "phantom" | "brats" (folder at `root`) | "tfds" (`tfds_name` under `data_dir`)
      root="",  # BraTS / MSD dataset root for source="brats" (and the manual dir when building tfds "brats/*")
      tfds_name="brats_phantom/vol32",
      data_dir="",  # TFDS data dir ("" = TFDS default)
      tfds_split="train",
      n_cases=16,  # phantom: cases generated; brats/tfds: first n_cases by case_id (0 = all)
      n_val=4,
      phantom_shape=(48, 48, 48),  # phantom head grid before preprocessing
      phantom_version="v2",  # "v2" (MNI152 anatomy, MR physics, grown tumours, look-alikes) | "v1" (before 2026-12)
      phantom=_phantom_defaults(),  # v2 knobs (mri_poison.data.phantom_v2.default_config); v1 ignores them
      shape=(32, 32, 32),  # grid after preprocessing (crop to brain + pad/crop)
      modalities=MODALITIES,
      seed=0,
      mode="3d",  # "3d" patches | "2d" axial slices
      patch_shape=(32, 32, 32),  # (X, Y) in mode "2d"
      fg_fraction=0.5,  # patches centred on a tumour voxel with this probability
      tumour_fraction=0.5,  # 2d: slices drawn from the tumour's slices with this probability
      batch_size=2,  # global batch; each process yields batch_size // process_count
      augment=dict(flip=True, scale=0.1, shift=0.1),
      read_threads=4,  # grain reader threads
      prefetch=4,  # batches prefetched
      allow_empty_modality=False,  # brats: an all-zero modality is an error (True: a warning)
  ))


def _phantom_defaults() -> ml_collections.ConfigDict:
  from mri_poison.data import phantom_v2  # pylint: disable=g-import-not-at-top
  return phantom_v2.default_config()


def phantom_options(data_cfg) -> tuple[str, dict | None]:
  """(version, generator options) of a data config's phantom; configs older than v2 mean v1."""
  version = str(data_cfg.get("phantom_version", "v1"))
  options = data_cfg.get("phantom") if version == "v2" else None
  return version, (options.to_dict() if isinstance(options, ml_collections.ConfigDict) else options)


def describe_source(data_cfg) -> str:
  """The data a config reads, in words, for reports (names the phantom version and its non-default knobs)."""
  source = str(data_cfg.source)
  if source != "phantom":
    spacing = tuple(float(s) for s in (folder_setting(data_cfg, "spacing") or ())) if source == "brats" else ()
    return (f"`{source}` data" + (f" from `{data_cfg.root}`" if data_cfg.get("root") else "")
            + (f", brains resampled to {'x'.join(f'{s:g}' for s in spacing)} mm (data.spacing)" if spacing else "")
            + " (the case ids of every split, each input file's SHA-256 and what preprocessing did to each scan: "
            "`data.json`)")
  version, options = phantom_options(data_cfg)
  if version == "v1":
    return "the embedded phantom v1 (procedural head, constant tissue intensities)"
  changed = {k: v for k, v in (options or {}).items() if _phantom_defaults().get(k) != v}
  knobs = "; " + ", ".join(f"{k} = {v}" for k, v in sorted(changed.items())) if changed else ""
  return ("the embedded phantom v2 (MNI152 anatomy, MR signal equations, grown tumours with mass effect, "
          f"look-alikes{knobs})")


def check_source(data_cfg) -> None:
  """The checks of `load_splits` that read no image, for a job that runs several studies and should fail before
  the first one starts: the counts, the source, and for a folder its cases, their labels and their number."""
  source, n_cases, n_val = str(data_cfg.source), int(data_cfg.n_cases), int(data_cfg.n_val)
  _check_counts(n_cases, n_val)
  shape_of(data_cfg.shape, "data_cfg.shape")
  if source not in SOURCES:
    raise DataError(f"data_cfg.source: expected one of {SOURCES}, got {source!r}")
  if source == "brats":
    from mri_poison.data.loaders import label_path
    root = str(data_cfg.root or "")
    refs = _folder_refs(root)[:n_cases or None]
    for ref in refs:
      if label_path(ref) is None:
        raise _unlabelled(ref, root)
    _check_found(len(refs), data_cfg)


def _check_counts(n_cases: int, n_val: int) -> None:
  if n_cases < 0:
    raise DataError(f"data_cfg.n_cases: expected >= 0, got {n_cases}")
  if n_val < 0 or (n_cases and n_val >= n_cases):
    raise DataError(f"data_cfg.n_val: expected 0 <= n_val < data_cfg.n_cases={n_cases}, got {n_val}")


def _check_found(found: int, data_cfg) -> None:
  """`found` cases for data.n_cases: fewer is an error (a warning with data.allow_fewer_cases=True)."""
  source, n_cases, n_val = str(data_cfg.source), int(data_cfg.n_cases), int(data_cfg.n_val)
  if n_cases and found < n_cases:
    where = f"{source} source" + (f" at {data_cfg.root}" if source == "brats" else "")
    message = (f"data.n_cases={n_cases}, but the {where} holds {found} cases: "
               f"{found - n_val} would train and {n_val} validate instead of {n_cases - n_val} and {n_val}")
    if not bool(folder_setting(data_cfg, "allow_fewer_cases")):
      raise DataError(f"{message}. Set data.n_cases <= {found} (0 = every case), or "
                      "data.allow_fewer_cases=True to train on what is there")
    logging.warning("%s (data.allow_fewer_cases=True: going on)", message)
  if n_val >= found:
    raise DataError(f"data_cfg.n_val: {n_val} validation cases leave no training case out of {found} "
                    f"(data_cfg.n_cases={n_cases}, source={source!r})")


def load_splits(data_cfg) -> dict[str, list[Case]]:
  """{"train": [...], "val": [...]} of cases preprocessed to `data_cfg.shape`."""
  source = str(data_cfg.source)
  n_cases, n_val = int(data_cfg.n_cases), int(data_cfg.n_val)
  shape = shape_of(data_cfg.shape, "data_cfg.shape")
  modalities = tuple(data_cfg.modalities)
  _check_counts(n_cases, n_val)
  if source == "phantom":
    if n_cases < 1:
      raise DataError("data_cfg.n_cases: the phantom source needs n_cases >= 1")
    version, options = phantom_options(data_cfg)
    cases = phantom_cases(n_cases, seed=int(data_cfg.seed), phantom_shape=data_cfg.phantom_shape,
                          shape=shape, modalities=modalities, version=version, options=options)
  elif source == "brats":
    cases = _folder_cases(str(data_cfg.root or ""), n_cases, shape, modalities, data_cfg)
  elif source == "tfds":
    cases = _tfds_cases(data_cfg, n_cases, shape, modalities)
  else:
    raise DataError(f"data_cfg.source: expected one of {SOURCES}, got {source!r}")
  cases = sorted(cases, key=lambda c: case_sort_key(c.case_id))[:n_cases or None]
  _check_found(len(cases), data_cfg)
  val_index = set(split_indices(len(cases), n_val, int(data_cfg.seed)))
  return {"train": [c for i, c in enumerate(cases) if i not in val_index],
          "val": [c for i, c in enumerate(cases) if i in val_index]}


def provenance(data_cfg, splits: dict[str, list[Case]]) -> dict:
  """What `splits` hold, for a run's manifest: the source (and root), the case ids of every split and, for a
  BraTS/MSD folder, each input file's path, size and SHA-256, so a reader can tell which scans a number came
  from (and whether a file changed since)."""
  source = str(data_cfg.source)
  out = {"source": source, "n_cases": int(data_cfg.n_cases), "n_val": int(data_cfg.n_val),
         "case_ids": {name: [c.case_id for c in cases] for name, cases in splits.items()}}
  if source == "phantom":
    out["seeds"] = "case phantom-i is built from seed data.seed + i"
  elif source == "tfds":
    out.update(tfds_name=str(data_cfg.tfds_name), tfds_split=str(data_cfg.tfds_split),
               data_dir=os.path.abspath(str(data_cfg.data_dir)) if data_cfg.data_dir else "(TFDS default)")
  elif source == "brats":
    from mri_poison.data.loaders import case_files, list_cases
    root = str(data_cfg.root)
    used = {c.case_id for cases in splits.values() for c in cases}
    files = {}
    for ref in list_cases(root):
      case_id, paths = case_files(ref)
      if case_id in used:
        files[case_id] = [{"path": os.path.relpath(p, root), "bytes": os.path.getsize(p),
                           "sha256": io_utils.file_sha256(p)} for p in paths]
    preprocessing = {c.case_id: c.preprocessing for cases in splits.values() for c in cases if c.preprocessing}
    out.update(root=os.path.abspath(root), files=files, preprocessing=preprocessing)
  return out


def write_provenance(workdir: str, data_cfg, splits: dict[str, list[Case]], name: str = "data") -> None:
  """Writes `provenance(data_cfg, splits)` to <workdir>/data.json under `name` (an arm's name where a run reads
  several data configs), keeping the other names there."""
  path = os.path.join(workdir, "data.json")
  record = {}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  record[name] = provenance(data_cfg, splits)
  io_utils.write_json(path, record)


def case_sort_key(case_id: str) -> list:
  """Natural order of case ids ("phantom-2" before "phantom-10")."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", case_id)]


def split_indices(n: int, n_val: int, seed: int) -> list[int]:
  """Sorted indices of the validation cases among `n` cases ordered by case_id."""
  return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:n_val])


def case_from_record(record, name: str = "<record>") -> Case:
  """A Case from a TFDS volume record (see mri_poison.data.tfds)."""
  image = np.asarray(record["image"], np.float32)
  if image.ndim != 4:
    raise DataError(f"TFDS {name}: records hold {image.ndim - 1}D images {image.shape}; Cases need 3D volumes "
                    "(use a vol* config, or feed 2D slice records to pipeline.train_iterator directly)")
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return Case(image=image, modalities=tuple(text(record["modalities"]).split(",")),
              label=np.asarray(record["label"], np.int32), affine=np.asarray(record["affine"], np.float64),
              spacing=tuple(float(s) for s in record["spacing"]), case_id=text(record["case_id"]))


def select_modalities(case: Case, modalities, where: str) -> Case:
  """The case restricted/reordered to `modalities`."""
  modalities = tuple(modalities)
  if case.modalities == modalities:
    return case
  missing = [m for m in modalities if m not in case.modalities]
  if missing:
    raise DataError(f"{where}: case {case.case_id} lacks modalities {missing} (has {case.modalities}); "
                    "check data_cfg.modalities")
  index = [case.modalities.index(m) for m in modalities]
  return case.replace(image=np.ascontiguousarray(case.image[..., index]), modalities=modalities)


def _folder_refs(root: str) -> list[str]:
  if not root:
    raise DataError("data_cfg.root: source='brats' needs the dataset root folder")
  from mri_poison.data.loaders import list_cases
  refs = sorted(list_cases(root))
  if not refs:
    raise DataError(f"data_cfg.root: no cases found under {root}")
  return refs


def _unlabelled(ref: str, root: str) -> DataError:
  case_id = os.path.basename(os.path.normpath(ref))
  return DataError(f"{ref}: no segmentation file (e.g. {case_id}_seg.nii.gz); training and evaluation need a label "
                   f"for every case under data.root={root} (move unlabelled cases elsewhere)")


def _folder_cases(root, n_cases, shape, modalities, data_cfg):
  from mri_poison.data.loaders import load_case
  # BraTS case ids are the folder names, so the first n_cases refs are the first n_cases by id.
  cases = []
  for ref in _folder_refs(root)[:n_cases or None]:
    case = load_case(ref, modalities, allow_empty_modality=bool(data_cfg.get("allow_empty_modality", False)))
    if case.label is None:
      raise _unlabelled(ref, root)
    cases.append(select_modalities(fit_to_grid(case, shape, data_cfg), modalities, f"data_cfg.root={root}"))
  return cases


def tfds_source(data_cfg):
  """Random-access source of TFDS `data_cfg.tfds_name` split `data_cfg.tfds_split` (for pipeline.train_iterator).

  Builds the dataset as array_record first if it is not there yet (brats_phantom needs nothing; brats reads
  the BraTS folder at `data_cfg.root` as its manual dir, see mri_poison.data.tfds.brats).
  """
  import tensorflow_datasets as tfds
  import mri_poison.data.tfds  # noqa: F401  registers the brats / brats_phantom builders
  name = str(data_cfg.tfds_name)
  prepare = {}
  if data_cfg.get("root"):
    prepare["download_config"] = tfds.download.DownloadConfig(manual_dir=str(data_cfg.root))
  try:
    with mri_poison.data.tfds.without_progress_bars():
      return tfds.data_source(name, data_dir=str(data_cfg.data_dir) or None, split=str(data_cfg.tfds_split),
                              builder_kwargs={"file_format": "array_record"}, download_and_prepare_kwargs=prepare)
  except Exception as e:  # tfds raises several types for unknown / unprepared datasets
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"data_cfg.tfds_name={name!r} (data_dir={data_cfg.data_dir!r}): cannot open the TFDS "
                    f"dataset: {reason}") from e


def _tfds_cases(data_cfg, n_cases, shape, modalities):
  name = str(data_cfg.tfds_name)
  source = tfds_source(data_cfg)
  cases = [case_from_record(source[i], name) for i in range(len(source))]
  cases = [select_modalities(c, modalities, f"data_cfg.tfds_name={name}") for c in cases]
  fix = f"Use a {name.split('/')[0]} config whose grid is data.shape={tuple(shape)}, or enlarge data.shape"
  return [c if c.shape == tuple(shape) else pad_or_crop_checked(c, tuple(shape), data_cfg, fix)[0] for c in cases]
