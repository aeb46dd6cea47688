"""One ONNX graph: exported from a torch module (dynamic batch and sequence axes, then the
checker), converted to fp16 or dynamic int8, run on ONNX Runtime's CPU provider, and compared
with torch (`parity`). `cots export` (training/export.py) builds bundles from these."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

OPSET = 17
PARITY_BATCHES = (1, 5)  # the batch sizes every parity check runs at


def export_onnx(module: nn.Module, feed: dict[str, np.ndarray], path: Path) -> None:
    """TorchScript-based export with a dynamic batch (and sequence) axis, then the checker."""
    import onnx

    names = list(feed)
    axes = {name: {0: "batch"} for name in names} | {"embedding": {0: "batch"}}
    if "input_ids" in feed:
        axes |= {name: {0: "batch", 1: "sequence"} for name in names}
    args = tuple(torch.from_numpy(value) for value in feed.values())
    with warnings.catch_warnings():
        # Shape arithmetic traced as constants; the parity check at two batch sizes is the
        # real test that the graph generalises.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def convert(path: Path, precision: str, out: Path) -> Path:
    """fp32 graph -> fp16 (inputs and outputs stay float32) or dynamic int8 weights."""
    import onnx

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        _topological_sort(model.graph)  # the converter appends its input casts at the end
        onnx.save(model, str(out))
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantiser logs one INFO line per tensor
        try:
            # MatMul/Gemm only: ORT's ConvInteger is slower than fp32 Conv on CPU (an
            # EfficientNet image tower ran 13x slower with its convolutions quantised).
            quantize_dynamic(
                str(path),
                str(out),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
    onnx.checker.check_model(str(out))
    return out


def _topological_sort(graph: Any) -> None:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        blocked = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ValueError("the converted graph has a cycle or a dangling input")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)


def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float32)


@torch.no_grad()
def run_torch(module: nn.Module, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    outs = [module(*(torch.from_numpy(v) for v in feed.values())) for feed in feeds]
    return torch.cat(outs).numpy()


def parity(path: Path, module: nn.Module, feeds: list[dict[str, np.ndarray]]) -> float:
    return float(np.abs(run_onnx(path, feeds) - run_torch(module, feeds)).max())
