"""Train the sync baseline and codistillation side by side, and compare them.

Single process, all groups local (the embedded default: both arms on MNIST-1D
with the 1-D CNN, 2 groups, in about a minute on 2 CPU cores):

    python train.py
    python train.py --mode=codistill --num_groups=4 --distance=mse --alpha=0.5
    python train.py --dataset=cifar10 --model=resnet20 --data_dir=~/tensorflow_datasets

Both arms use the same total batch (`--batch_size`; codistillation splits it
into `--num_groups` groups) and the same number of updates per model.
Writes to `--workdir`: `results.json`, `comparison.png`, and per arm
TensorBoard logs (`<arm>/tensorboard`) and a per-epoch `<arm>/history.csv`.

The program is `tf_codistill/train.py` (`python -m tf_codistill.train` where
the package is installed); this file runs it from a clone.
"""

import sys

from absl import app, flags

from tf_codistill import train as _program  # defines the flags; loads no TensorFlow

if __name__ == "__main__":
    flags.adopt_module_key_flags(_program)  # --help lists its flags as this script's own
    app.run(_program.main, flags_parser=_program.parse_flags)
else:
    # `import train` (tests, benchmarks) is the program module itself: its
    # flags, `main`, `parse_flags` and `train_and_evaluate`.
    sys.modules[__name__] = _program
