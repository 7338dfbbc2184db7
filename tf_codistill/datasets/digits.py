"""scikit-learn's bundled 8x8 handwritten digits (1,797 images) as a TFDS builder.

Fixed split: a seeded permutation, the first 80% for training (1,437), the rest
for testing (360). Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


class Digits(tfds.core.GeneratorBasedBuilder):
    """8x8 grey-scale digits, ten classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From sklearn.datasets.load_digits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        order = np.random.default_rng(0).permutation(len(bunch.target))
        images = (bunch.images[order] / 16.0).astype(np.float32)[..., None]
        labels = bunch.target[order]
        cut = int(0.8 * len(labels))
        return {
            "train": self._generate_examples(images[:cut], labels[:cut]),
            "test": self._generate_examples(images[cut:], labels[cut:]),
        }

    def _generate_examples(self, images, labels):
        for i, (x, y) in enumerate(zip(images, labels)):
            yield i, {"image": x, "label": int(y)}
