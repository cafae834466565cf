"""Data: the Case record, BraTS/MSD loaders, preprocessing, the phantom, TFDS builders, the grain pipeline."""
from mri_poison.data.case import Case, DataError, LABELS, MODALITIES, REGION_LABELS, REGIONS, brats_regions
from mri_poison.data.loaders import list_cases, load_brats_case, load_case, load_msd_case
from mri_poison.data.preprocess import (brain_mask, crop_to_brain, extract_slices, pad_or_crop, preprocess_case,
                                       resample, zscore)
from mri_poison.data.datasets import default_data_config, load_splits
from mri_poison.data.grid import fit_to_grid
from mri_poison.data.pipeline import (cut_patch, paste_patch, stack_datasets, train_dataset, train_iterator,
                                      zip_datasets)
from mri_poison.data import phantom
