"""One interface over the engines that run a part: onnxruntime (CPU here; CUDA / TensorRT execution providers when
the installed onnxruntime has them) and a TensorRT engine through the `tensorrt` Python API (the Orin).

Both take and return torch tensors keyed by the part's tensor names. Each backend object owns its session / execution
context (and CUDA stream), so the pipelined runner gives every stage thread its own.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}


class BackendUnavailable(RuntimeError):
    """The requested engine library (onnxruntime, tensorrt) or a GPU is missing here."""


class Backend(Protocol):
    """A part ready to run: its input and output names, and one call per frame."""

    inputs: list[str]
    outputs: list[str]
    description: str

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named input tensors -> named output tensors."""


def _import(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise BackendUnavailable(f"{name} is not importable ({err}): {what}") from None


def ort_providers(requested: list[str] | None = None) -> list[str]:
    """The execution providers to use: the requested ones, else the best this onnxruntime build has."""
    ort = _import("onnxruntime", "pip install onnxruntime (onnxruntime-gpu on a GPU machine)")
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendUnavailable(f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)})")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRuntimeBackend:
    """An ONNX part in onnxruntime; `threads` sets the intra-op pool (None: onnxruntime's default)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        ort = _import("onnxruntime", "pip install onnxruntime (onnxruntime-gpu on a GPU machine)")
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=ort_providers(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.description = f"{Path(path).name} on onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """onnxruntime on CPU copies of the inputs; outputs come back as CPU tensors."""
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy()) for name in self.inputs}
        return {name: torch.from_numpy(v) for name, v in zip(self.outputs, self.session.run(self.outputs, arrays),
                                                             strict=True)}


class TensorRTBackend:
    """A serialized TensorRT engine (TensorRT >= 8.5 name-based I/O, execute_async_v3) on its own CUDA stream.

    Written against the TensorRT Python API for the Orin and untested here (no GPU, no TensorRT on this machine).
    Inputs are cast to the engine's I/O types; DLA engines built with --useDLACore are deserialized on that core.
    Standalone DLA loadables (cuDLA, vectorized I/O formats) are not engines and are not run by this class.
    """

    def __init__(self, path: str | Path, dla_core: int | None = None) -> None:
        trt = _import("tensorrt", "TensorRT engines run on the Orin (JetPack); use the onnxruntime backend here")
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"TensorRT {trt.__version__} needs a CUDA GPU, and torch sees none")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if dla_core is not None:
            runtime.DLA_core = dla_core
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT {trt.__version__} could not deserialize {path} (built by another "
                                     "TensorRT version or device?): rebuild it with scripts/build_engines.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: TRT_TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.stream = torch.cuda.Stream()
        where = f"DLA core {dla_core}" if dla_core is not None else "GPU"
        self.description = f"{Path(path).name} on TensorRT {trt.__version__} ({where})"

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind device copies of the inputs and fresh outputs, enqueue on this backend's stream, wait."""
        with torch.cuda.stream(self.stream):
            inputs = {n: feeds[n].to("cuda", self.dtypes[n], non_blocking=True).contiguous() for n in self.inputs}
            outputs = {n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device="cuda") for n in self.outputs}
            for name, tensor in {**inputs, **outputs}.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to enqueue {self.description}")
        self.stream.synchronize()
        return {n: t.float() if t.is_floating_point() else t for n, t in outputs.items()}
