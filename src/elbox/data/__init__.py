"""Datasets, splits, data spaces and batching.

  elbox.data.formats   reading file formats: IDX (plain or gzipped), CIFAR-10 binary batches, users' .npy/.npz
                       (checked, memory-mapped) and the images users give to `elbox score`
  elbox.data.user      users' own data by path as lazily-reading Datasets: `open_source`, over
                       user_images (ImageFolder), user_arrays (ImageArray, VectorArray), user_tables (Table)
  elbox.data.sources   the datasets (specs, registry, the synthetic dataset), where their files are
                       found, downloads with checksums
  elbox.data.splits    the train/validation/train-full/test splits: `load_split`
  elbox.data.spaces    data spaces (uint8 images or real vectors -> model inputs) and `iterate_batches`

The names below are re-exported here. Module settings are not: patch them where they live
(elbox.data.sources.SYSTEM_DATA_DIRS, elbox.data.sources.DOWNLOAD_TIMEOUT_S).
"""

from elbox.data.dataset_files import CIFAR_CLASSES, read_idx
from elbox.data.sources import (
    CIFAR10_FILES,
    CIFAR_BINARY,
    DATASETS,
    IDX,
    IDX_FILES,
    SYNTHETIC,
    SYNTHETIC_SEED,
    SYNTHETIC_SIZES,
    DatasetSpec,
    Opener,
    dataset_names,
    download_dataset,
    find_dataset_dir,
    get_dataset_spec,
    user_cache_dir,
)
from elbox.data.spaces import (
    DATA_SPACES,
    BinarySpace,
    ContinuousSpace,
    DataSpace,
    DiscreteSpace,
    RealSpace,
    fit_real_space,
    get_data_space,
    iterate_batches,
    model_data_space,
    space_from_record,
    space_record,
)
from elbox.data.splits import SPLITS, clear_cache, load_split
from elbox.data.user import ImageArray, ImageFolder, Table, VectorArray, open_source

__all__ = [
    "BinarySpace",
    "CIFAR10_FILES",
    "CIFAR_BINARY",
    "CIFAR_CLASSES",
    "ContinuousSpace",
    "DATASETS",
    "DATA_SPACES",
    "DataSpace",
    "DatasetSpec",
    "DiscreteSpace",
    "IDX",
    "IDX_FILES",
    "ImageArray",
    "ImageFolder",
    "Opener",
    "RealSpace",
    "SPLITS",
    "SYNTHETIC",
    "SYNTHETIC_SEED",
    "SYNTHETIC_SIZES",
    "Table",
    "VectorArray",
    "clear_cache",
    "dataset_names",
    "download_dataset",
    "find_dataset_dir",
    "fit_real_space",
    "get_data_space",
    "get_dataset_spec",
    "iterate_batches",
    "load_split",
    "model_data_space",
    "open_source",
    "read_idx",
    "space_from_record",
    "space_record",
    "user_cache_dir",
]
