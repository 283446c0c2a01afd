"""bevfusion-ext: progressive pruning, INT8 QAT and Orin DLA/GPU export for BEVFusion."""
from setuptools import find_packages, setup

setup(
    name="bevfusion_ext",
    version="0.1.0",
    description="Compress BEVFusion inside its own torchpack + mmcv training loop and export it for NVIDIA Orin",
    packages=find_packages(include=["bevfusion_ext", "bevfusion_ext.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "mmcv>=1.4,<2",
        "torchpack==0.3.1",
        "torch-pruning>=1.6",
        "nvidia-modelopt>=0.47",
        "onnx",
        "onnxruntime",
    ],
)
