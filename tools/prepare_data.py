"""Prepare a TFDS dataset in a data directory, so that `train.py --data_dir` can read it.

train.py never downloads: a dataset other than the built-in ones (mnist1d,
mnist1d/n<samples>, digits: generated offline on first use) must be prepared in
`--data_dir` first, on a machine with a network. This runs TFDS's
`download_and_prepare`, then checks the result the way train.py will read it:

    python tools/prepare_data.py cifar10 --data_dir=~/tensorflow_datasets
    python train.py --dataset=cifar10 --model=resnet20 --data_dir=~/tensorflow_datasets

Already prepared: nothing is downloaded. The Kubernetes manifests that train on
CIFAR-10 run this in an init container (deploy/k8s/README.md). `tfds build NAME`
does the same download, but in tensorflow-datasets 4.9.10 its command line
imports apache-beam, which this project does not install.

Exit status: 0 prepared, 2 a bad argument or an unknown dataset, 1 the download
or preparation failed (the message says why).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare(name: str, data_dir: str | None):
    """Prepares dataset `name` in `data_dir` (TFDS's default when None) and
    returns its `tf_codistill.data.DatasetSpec`.

    Raises:
        ValueError: an unknown dataset, or one train.py cannot use.
    """
    import tensorflow_datasets as tfds

    from tf_codistill import data  # also registers the built-in builders

    if name.split("/")[0] not in data.BUILTIN_DATASETS:  # built in: load_spec generates them
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"Unknown dataset {name!r}: not a registered TFDS name (tfds.list_builders() lists them)."
            ) from None
        if not builder.is_prepared():
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    return data.load_spec(name, data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a TFDS name, e.g. cifar10")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (TFDS's default when unset)")
    args = parser.parse_args(argv)
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
    try:
        spec = prepare(args.dataset, data_dir)
    except (ValueError, TypeError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a download or preparation failure, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(
            f"prepare_data: error: could not prepare {args.dataset!r} ({type(err).__name__}: {first}); "
            "it downloads the data, so run it where there is a network.",
            file=sys.stderr,
        )
        return 1
    where = data_dir or "TFDS's default data directory"
    print(
        f"prepared {spec.name} in {where}: {spec.num_train:,} training and {spec.num_test:,} test "
        f"examples, {spec.num_classes} classes, input shape {spec.input_shape}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
