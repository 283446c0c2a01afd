"""Frames through the runtime one after another, or pipelined (seed 6.1): pre-processing, the camera and lidar
branches, fuser + heads and post-processing each on their own thread, so the two branches of a frame run
concurrently and consecutive frames overlap. Every stage keeps frame order and runs the same Runtime methods, so the
outputs equal the sequential runner's.

On the Orin the same threads drive TensorRT engines on their own CUDA streams (TensorRTBackend); here onnxruntime
releases the GIL inside each part, and torch's kernels release it too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .runtime import Frame, Prediction, Runtime

POLL_S = 0.05  # how often a blocked stage checks whether the consumer went away


@dataclass
class Timed:
    """One frame's output and its latency (admission to the end of post-processing)."""

    index: int
    name: str
    prediction: Prediction
    latency_s: float


def run_sequential(runtime: Runtime, frames: Iterable[Frame]) -> Iterator[Timed]:
    """Every frame through every stage before the next frame starts."""
    for index, frame in enumerate(frames):
        start = time.perf_counter()
        prediction = runtime.run(frame)
        yield Timed(index, frame.name, prediction, time.perf_counter() - start)


@dataclass
class _Failed:
    error: BaseException


_END = object()


def _put(outputs: list[queue.Queue], item: Any) -> None:
    """Put `item` on every queue (unbounded: the frames in flight are bounded at the source)."""
    for out in outputs:
        out.put(item)


def _get(source: queue.Queue, stop: threading.Event) -> Any:
    """The next item of a queue, or _END once the consumer has gone."""
    while not stop.is_set():
        try:
            return source.get(timeout=POLL_S)
        except queue.Empty:
            continue
    return _END


class _Stage(threading.Thread):
    """One pipeline stage: take one item from each input queue, apply `work`, put the result on every output queue.
    The end marker and failures travel down the pipeline to the consumer."""

    def __init__(self, name: str, work: Callable[..., Any], inputs: list[queue.Queue], outputs: list[queue.Queue],
                 stop: threading.Event) -> None:
        super().__init__(name=f"bevfusion-{name}", daemon=True)
        self.work, self.inputs, self.outputs, self.stop = work, inputs, outputs, stop

    def run(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                items = [_get(q, self.stop) for q in self.inputs]
                ended = next((i for i in items if i is _END or isinstance(i, _Failed)), None)
                if ended is not None:
                    _put(self.outputs, ended)
                    return
                try:
                    result = self.work(*items)
                except BaseException as err:  # handed to the consumer, which re-raises it
                    _put(self.outputs, _Failed(err))
                    return
                _put(self.outputs, result)


def _feed(frames: Iterable[Frame], out: queue.Queue, slots: threading.Semaphore, stop: threading.Event) -> None:
    """The source thread: (index, frame, admission time) once a slot is free, then the end marker (or the failure of
    the frame iterator). A frame's latency counts from its admission."""
    try:
        for index, frame in enumerate(frames):
            while not slots.acquire(timeout=POLL_S):
                if stop.is_set():
                    return
            _put([out], (index, frame, time.perf_counter()))
    except BaseException as err:
        _put([out], _Failed(err))
        return
    _put([out], _END)


class PipelinedRunner:
    """pre -> (camera || lidar) -> fuser + heads -> post, one thread each, with at most `depth` frames in flight.

    The bound keeps the latency that of a frame sharing the machine with depth - 1 others (a free-running source would
    otherwise queue frames between the stages and count the queueing as latency).
    """

    def __init__(self, runtime: Runtime, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth (frames in flight) must be at least 1, got {depth}")
        self.runtime, self.depth = runtime, depth

    def run(self, frames: Iterable[Frame]) -> Iterator[Timed]:
        """Outputs in frame order, as each frame finishes post-processing."""
        rt, stop, slots = self.runtime, threading.Event(), threading.Semaphore(self.depth)
        q = {name: queue.Queue() for name in ("frames", "camera", "lidar", "camera_bev", "lidar_bev", "raw", "out")}

        def pre(item: tuple) -> tuple:
            index, frame, start = item
            return index, frame.name, start, rt.preprocess(frame)

        def heads(camera: tuple, lidar: tuple) -> tuple:
            return (*camera[:3], rt.heads(camera[3], lidar[3]))

        def post(item: tuple) -> Timed:
            index, name, start, raw = item
            prediction = rt.postprocess(raw)
            return Timed(index, name, prediction, time.perf_counter() - start)

        stages = [
            _Stage("pre", pre, [q["frames"]], [q["camera"], q["lidar"]], stop),
            _Stage("camera", lambda p: (*p[:3], rt.camera(p[3])), [q["camera"]], [q["camera_bev"]], stop),
            _Stage("lidar", lambda p: (*p[:3], rt.lidar(p[3])), [q["lidar"]], [q["lidar_bev"]], stop),
            _Stage("heads", heads, [q["camera_bev"], q["lidar_bev"]], [q["raw"]], stop),
            _Stage("post", post, [q["raw"]], [q["out"]], stop),
        ]
        for stage in stages:
            stage.start()
        threading.Thread(target=_feed, args=(frames, q["frames"], slots, stop), daemon=True,
                         name="bevfusion-feed").start()
        try:
            while True:
                item = q["out"].get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                slots.release()
                yield item
        finally:
            stop.set()
