"""Split a checked ONNX part into DLA and GPU segments, the way TensorRT's GPU fallback will, and count the cost.

Each contiguous DLA run of a topological order is one DLA loadable (TensorRT also starts a new loadable when the DLA
batch changes); every DLA<->GPU boundary is a reformat + copy. The order is chosen greedily to keep the current device
as long as possible, so independent branches on the same device merge instead of ping-ponging.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import onnx

from .dla_rules import GraphInfo, NodeVerdict, graph_info, is_layer, layer_name

MAX_LOADABLES_PER_CORE = 16


@dataclass
class Segment:
    """A contiguous run of layers on one device; `inputs`/`outputs` are the tensors crossing its border."""

    device: str
    layers: list[str]
    op_types: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    batch: int | None = None


@dataclass
class Plan:
    """Where every layer of a part runs, how many DLA loadables and transitions that costs, and how to do better."""

    segments: list[Segment]
    dla_loadables: int
    transitions: int
    fits_dla_entirely: bool
    within_loadable_limit: bool
    op_summary: dict[str, dict]
    suggestions: list[dict] = field(default_factory=list)
    max_loadables_per_core: int = MAX_LOADABLES_PER_CORE

    def to_dict(self) -> dict:
        """Plain dict, for the deploy report."""
        return asdict(self)

    def to_json(self) -> str:
        """JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2)


def _dependencies(layers: list[onnx.NodeProto], info: GraphInfo) -> list[set[int]]:
    """For each layer, the indices of the layers producing its inputs (looking through Q/DQ/Identity)."""
    index = {o: i for i, n in enumerate(layers) for o in n.output}
    return [{index[info.source(t)] for t in n.input if t and info.source(t) in index} for n in layers]


def _device_order(keys: list[tuple], deps: list[set[int]]) -> list[int]:
    """A topological order that stays on the current device key while it can (Kahn's algorithm with affinity)."""
    users: list[list[int]] = [[] for _ in keys]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready: dict[tuple, list[int]] = {}
    for i, n in enumerate(pending):
        if n == 0:
            heapq.heappush(ready.setdefault(keys[i], []), i)
    order, current = [], None
    while any(ready.values()):
        if not ready.get(current):
            current = min((k for k, h in ready.items() if h), key=lambda k: ready[k][0])
        i = heapq.heappop(ready[current])
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready.setdefault(keys[u], []), u)
    return order


def _segment(device: str, members: list[int], layers: list[onnx.NodeProto], info: GraphInfo, readers: dict) -> Segment:
    """A segment's summary; `readers` maps a tensor to the layer indices (or "graph output") reading it."""
    nodes, inside = [layers[i] for i in members], set(members)
    produced = [o for n in nodes for o in n.output if o]
    inputs = dict.fromkeys(t for n in nodes for t in info.data_inputs(n) if t not in produced)
    return Segment(
        device=device,
        layers=[layer_name(n) for n in nodes],
        op_types=dict(Counter(n.op_type for n in nodes)),
        inputs=list(inputs),
        outputs=[o for o in produced if readers.get(o, set()) - inside],
        batch=info.batch(nodes[0].output[0]) if device == "DLA" else None,
    )


def _readers(layers: list[onnx.NodeProto], info: GraphInfo, graph_outputs: list[str]) -> dict[str, set]:
    readers: dict[str, set] = {}
    for i, n in enumerate(layers):
        for t in info.data_inputs(n):
            readers.setdefault(t, set()).add(i)
    for o in graph_outputs:
        readers.setdefault(info.source(o), set()).add("graph output")
    return readers


def _op_summary(verdicts: list[NodeVerdict]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for v in verdicts:
        entry = summary.setdefault(v.op_type, {"dla": 0, "gpu": 0, "reasons": {}})
        entry["dla" if v.on_dla else "gpu"] += 1
        if not v.on_dla:
            entry["reasons"][v.reason] = entry["reasons"].get(v.reason, 0) + 1
    return summary


def _suggestions(verdicts: list[NodeVerdict]) -> list[dict]:
    """One entry per (reason, suggestion), most frequent first, naming the layers it would move to the DLA."""
    grouped: dict[tuple[str, str], list[NodeVerdict]] = {}
    for v in verdicts:
        if not v.on_dla and v.suggestion:
            grouped.setdefault((v.reason, v.suggestion), []).append(v)
    entries = [
        {
            "reason": reason,
            "suggestion": suggestion,
            "count": len(vs),
            "op_types": sorted({v.op_type for v in vs}),
            "layers": [v.name for v in vs],
        }
        for (reason, suggestion), vs in grouped.items()
    ]
    return sorted(entries, key=lambda e: -e["count"])


def partition(model: onnx.ModelProto, verdicts: list[NodeVerdict]) -> Plan:
    """Group the layers into DLA/GPU segments in execution order; `verdicts` come from `check_model(model)`."""
    info = graph_info(model)
    layers = [n for n in model.graph.node if is_layer(n)]
    if len(layers) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(layers)} layers: pass check_model(model) of this model")
    placed = zip(layers, (v.on_dla for v in verdicts), strict=True)
    keys = [("DLA", info.batch(n.output[0])) if on_dla else ("GPU", None) for n, on_dla in placed]
    runs: list[tuple[tuple, list[int]]] = []
    for i in _device_order(keys, _dependencies(layers, info)):
        if runs and runs[-1][0] == keys[i]:
            runs[-1][1].append(i)
        else:
            runs.append((keys[i], [i]))
    readers = _readers(layers, info, [o.name for o in model.graph.output])
    segments = [_segment(key[0], members, layers, info, readers) for key, members in runs]
    devices = [s.device for s in segments]
    dla = devices.count("DLA")
    return Plan(
        segments=segments,
        dla_loadables=dla,
        transitions=sum(a != b for a, b in pairwise(devices)),
        fits_dla_entirely=all(v.on_dla for v in verdicts) and dla <= 1,
        within_loadable_limit=dla <= MAX_LOADABLES_PER_CORE,
        op_summary=_op_summary(verdicts),
        suggestions=_suggestions(verdicts),
    )
