from setuptools import find_packages, setup

setup(
    name="qin-triton",
    version="0.1.0",
    description="Quadratic Interest Network (QIN) for multimodal CTR prediction, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "qin", "qin.*", "bench", "bench.*"]),
    package_data={"qin": ["configs/*.yaml"]},
    install_requires=[
        # The floor is the oldest pair .ci/versions.sh tests (README, "Supported versions"). No upper
        # bound: pip keeps the torch a user has; `pip install torch==2.13.0 -e .` still takes the CPU build.
        "torch>=2.7",
        # PyPI has triton wheels for Linux x86_64 and aarch64 only; elsewhere `import kernels` falls
        # back to the PyTorch reference (kernels/torch_only.py).
        'triton>=3.3; platform_system == "Linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")',
        "numpy>=1.24",
        "pyarrow>=14",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # the plots of `qin bench` and curves.png
        "tensorboard>=2.14",  # the event files of a training run (torch.utils.tensorboard writes them)
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.80", "pytest-benchmark>=4", "pytest-xdist>=3"],
        "bench": ["pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["qin=qin.cli:console_main"]},
)
