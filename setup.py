"""Packaging for tf_codistill (the library) and models (the model builders).

Install: pip install -e .   (the pinned stack is in requirements.txt)
GPU machines: pip install -e .[gpu]  (TensorFlow with CUDA instead of the CPU build)
"""

from setuptools import find_packages, setup

CORE = [
    "keras>=3.12,<3.16",
    "tensorflow-datasets>=4.9,<5",
    "absl-py>=2.1",
    "mnist1d==0.0.2.post1",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tensorboard>=2.20",
    "numpy>=1.26",
    "importlib_resources>=6",
]

setup(
    name="tf_codistill",
    version="0.1.0",
    description="Codistillation for TensorFlow/Keras: replica groups that distil from each other "
    "instead of all-reducing gradients (Sinha et al., 2021).",
    # TensorFlow 2.21 has wheels for CPython 3.11-3.13; Horovod builds on each (docs/python_versions.md).
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    packages=find_packages(include=["tf_codistill", "tf_codistill.*", "models", "models.*"]),
    install_requires=CORE,
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6"],
    },
)
