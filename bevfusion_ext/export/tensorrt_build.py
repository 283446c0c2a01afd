"""In-process engine build through the TensorRT Python API, used when tensorrt and a CUDA GPU are present (the Orin).

Kept thin on purpose: it does what the trtexec commands of `trtexec.py` do (same flags, same DLA memory pools), and
`tensorrt` is imported only inside the calls, so this module imports anywhere. Without TensorRT (CI, this machine)
`tensorrt_available()` says why and `build_engine` raises `TensorRTUnavailable` with that reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .calib_cache import calib_tag
from .trtexec import DLA_MEM_POOLS_MIB, FLAVOURS, io_formats_from_onnx

TRT_MEMORY_POOLS = {"dlaSRAM": "DLA_MANAGED_SRAM", "dlaLocalDRAM": "DLA_LOCAL_DRAM", "dlaGlobalDRAM": "DLA_GLOBAL_DRAM"}
TRT_FORMATS = {"dla_hwc4": "DLA_HWC4", "dla_linear": "DLA_LINEAR", "chw32": "CHW32", "chw16": "CHW16"}


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; build with scripts/build_engines.sh on the Orin instead."""


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT can build here, else (False, why not)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as e:
        return False, f"tensorrt not importable ({e}); build on the Orin with scripts/build_engines.sh"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # TensorRT raises a bare TypeError/RuntimeError when CUDA cannot initialise
        return False, f"no CUDA GPU: TensorRT {trt.__version__} cannot create a builder ({e})"
    return True, f"TensorRT {trt.__version__}, {builder.num_DLA_cores} DLA core(s)"


def _check_args(flavour: str, calib_cache: str | os.PathLike | None, dla_core: int | None, standalone: bool) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if flavour == "noqdq" and calib_cache is None:
        raise ValueError("the Q/DQ-free ONNX builds INT8 only with its calibration cache (calib_cache=...)")
    if standalone and dla_core is None:
        raise ValueError("a standalone DLA loadable needs dla_core")


def _cache_calibrator(trt: Any, cache_path: str | os.PathLike) -> Any:
    """An entropy calibrator that never sees data: it hands TensorRT the QAT scales of the cache."""
    _, body = Path(cache_path).read_bytes().split(b"\n", 1)
    cache = calib_tag(trt.__version__).encode() + b"\n" + body  # the header must name the running TensorRT

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: bytes) -> None:
            return None

    return CacheCalibrator()


def _network_flags(trt: Any) -> int:
    """Explicit batch: a flag before TensorRT 10, the only mode (flag deprecated) from 10 on."""
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _layers(network: Any) -> list[Any]:
    return [network.get_layer(i) for i in range(network.num_layers)]


def _pin_fp32(trt: Any, config: Any, network: Any, fp32_layers: set[str]) -> dict:
    """Keep the layers whose activations overflow FP16 (and their outputs) in FP32 in an FP16 build."""
    if not fp32_layers:
        return {}
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = [layer for layer in _layers(network) if layer.name in fp32_layers]
    for layer in pinned:
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
    return {"fp32_layers_not_found": sorted(fp32_layers - {layer.name for layer in pinned})}


def _set_precision(trt: Any, config: Any, network: Any, flavour: str, calib_cache: Any, fp16_layers: set[str],
                   fp32_layers: set[str]) -> dict:
    """FP16 always (overflowing layers pinned to FP32); INT8 from Q/DQ or from the cache with the FP16 list pinned."""
    config.set_flag(trt.BuilderFlag.FP16)
    if flavour == "fp16":
        return _pin_fp32(trt, config, network, fp32_layers)
    config.set_flag(trt.BuilderFlag.INT8)
    if flavour != "noqdq":
        return {}
    config.int8_calibrator = _cache_calibrator(trt, calib_cache)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    pinned = [layer for layer in _layers(network) if layer.name in fp16_layers]
    for layer in pinned:
        layer.precision = trt.float16
    return {"fp16_layers_not_found": sorted(fp16_layers - {layer.name for layer in pinned})}


def _set_io_formats(trt: Any, network: Any, io_formats: dict[str, list[str]]) -> None:
    tensors = {
        "inputs": [network.get_input(i) for i in range(network.num_inputs)],
        "outputs": [network.get_output(i) for i in range(network.num_outputs)],
    }
    for kind, formats in io_formats.items():
        for tensor, fmt in zip(tensors[kind], formats, strict=True):
            dtype, layout = fmt.split(":")
            tensor.dtype = {"int8": trt.int8, "fp16": trt.float16}[dtype]
            tensor.allowed_formats = 1 << int(getattr(trt.TensorFormat, TRT_FORMATS[layout]))


def _set_dla(trt: Any, builder: Any, config: Any, network: Any, core: int, io_formats: dict | None) -> dict:
    """DLA as default device (GPU fallback unless standalone); reports which layers TensorRT can put on the DLA."""
    if core >= builder.num_DLA_cores:
        raise RuntimeError(f"DLA core {core} requested but this device has {builder.num_DLA_cores}; build on the Orin")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    for pool, mib in DLA_MEM_POOLS_MIB.items():
        config.set_memory_pool_limit(getattr(trt.MemoryPoolType, TRT_MEMORY_POOLS[pool]), mib << 20)
    if io_formats is None:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    else:
        config.engine_capability = trt.EngineCapability.DLA_STANDALONE
        _set_io_formats(trt, network, io_formats)
    layers = _layers(network)
    gpu = [layer.name for layer in layers if not config.can_run_on_DLA(layer)]
    return {"layers": len(layers), "layers_on_dla": len(layers) - len(gpu), "layers_not_on_dla": gpu}


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    flavour: str,
    calib_cache: str | os.PathLike | None = None,
    dla_core: int | None = None,
    fp16_layers: Iterable[str] = (),
    fp32_layers: Iterable[str] = (),
    standalone: bool = False,
    io_formats: dict[str, list[str]] | None = None,
) -> dict:
    """Build one engine (or standalone DLA loadable) like the matching trtexec command; returns a placement report."""
    _check_args(flavour, calib_cache, dla_core, standalone)
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)
    trt = importlib.import_module("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    report = _set_precision(trt, config, network, flavour, calib_cache, set(fp16_layers), set(fp32_layers))
    if dla_core is not None:
        formats = (io_formats or io_formats_from_onnx(onnx_path, calib_cache)) if standalone else None
        report.update(_set_dla(trt, builder, config, network, dla_core, formats))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} ({flavour}, DLA core {dla_core}); see its log")
    Path(out_path).write_bytes(bytes(serialized))
    return {"engine": str(out_path), "flavour": flavour, "dla_core": dla_core, "standalone": standalone, **report}
