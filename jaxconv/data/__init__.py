"""Data: IDX files, datasets (Fashion-MNIST, image folders, synthetic), augmentation and
evaluation crops in numpy/Pillow, and the grain input pipeline."""
from jaxconv.data.augment import (EvalTransform, IMAGENET_EIGVAL, IMAGENET_EIGVEC, TrainTransform, pca_from_images,
                                  pca_lighting, random_resized_crop, ten_crop)
from jaxconv.data.datasets import (Dataset, fashion_mnist, get_dataset, image_folder, synthetic)
from jaxconv.data.idx import IdxError, parse_idx, read_idx, write_idx
from jaxconv.data.pipeline import device_prefetch, eval_dataset, steps_per_epoch, train_dataset

__all__ = ["Dataset", "EvalTransform", "IMAGENET_EIGVAL", "IMAGENET_EIGVEC", "IdxError", "TrainTransform",
           "device_prefetch", "eval_dataset", "fashion_mnist", "get_dataset", "image_folder", "parse_idx",
           "pca_from_images", "pca_lighting", "random_resized_crop", "read_idx", "steps_per_epoch", "synthetic",
           "ten_crop", "train_dataset", "write_idx"]
