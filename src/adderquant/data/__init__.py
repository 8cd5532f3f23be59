"""Data: readers for the layouts the project meets (npz shards with meta.json, CIFAR python pickles,
ImageFolder trees, a single .npz), batched tensor-side augmentation, and in-memory batching."""

from .augment import normalize, normalized_black, random_crop_flip
from .dataset import Dataset
from .load import load_dataset
from .loader import batches, calibration_indices, calibration_subset, calibration_tensor, tensor_batches
from .normalization import CIFAR_ADDERNET_NORM, CIFAR_APOT_NORM, IMAGENET_NORM

__all__ = ["Dataset", "load_dataset", "random_crop_flip", "normalize", "normalized_black", "batches",
           "calibration_indices", "calibration_subset", "calibration_tensor", "tensor_batches", "CIFAR_ADDERNET_NORM",
           "CIFAR_APOT_NORM", "IMAGENET_NORM"]
