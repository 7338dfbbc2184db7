"""TFDS builders of this project, registered on import: `mnist1d`, `digits`.

Both are generated offline on first use (`download_and_prepare`), so they work
on a machine without network access.
"""

from tf_codistill.datasets.digits import Digits
from tf_codistill.datasets.mnist1d import Mnist1d, Mnist1dConfig

__all__ = ["Digits", "Mnist1d", "Mnist1dConfig"]
