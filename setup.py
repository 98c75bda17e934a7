"""Build and install lsr.

Install with the torch you will run it with, without build isolation (an isolated build
could pull another torch):

    pip install torch==2.13.0 setuptools wheel
    pip install --no-build-isolation .
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="lsr",
    version="0.1.0",
    description="Image anomaly detection by Latent Space Resampling (VQ-VAE + PixelSNAIL prior)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lsr", "lsr.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.10",
        "scikit-image>=0.22",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tifffile>=2023.1",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "scikit-learn>=1.3"],
    },
    entry_points={
        "console_scripts": [
            "lsr=lsr.cli:main",
            "lsr-export=lsr.cli:export_main",
        ],
    },
)
