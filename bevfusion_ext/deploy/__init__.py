"""The deployed model's runtime, shipped alone in every deploy bundle as lib/python: it imports torch, numpy, PyYAML and
onnxruntime or tensorrt, never the training code (the reference model imports its kernels from here instead).

    from bevfusion_ext.deploy import Runtime, Frame
    runtime = Runtime("deploy/", flavour="fp32", backend="onnxruntime")
    prediction = runtime.run(Frame.load("deploy/data/sample_data/frame_000.npz"))
"""

from .backends import BackendUnavailable, OnnxRuntimeBackend, TensorRTBackend
from .runtime import Frame, FrameError, Prediction, Runtime, load_frames
from .spec import BundleError, BundleSpec

__all__ = [
    "BackendUnavailable",
    "BundleError",
    "BundleSpec",
    "Frame",
    "FrameError",
    "OnnxRuntimeBackend",
    "Prediction",
    "Runtime",
    "TensorRTBackend",
    "load_frames",
]
