"""The vision graph as ONNX: `pixel_values[T,3,S,S] -> image_embeds[T,n,d]` with a dynamic tile axis.

What is exported is exactly `EyecareGPTForConditionalGeneration.encode_tiles`: SigLIP tower
(eager attention), Layer-wise Dense Connector and the `mlp2x_gelu` projector. The anyres layout
(unpad, compression, `image_newline`) stays host-side numpy code, so the graph has one dynamic
axis, the tiles, which both ONNX Runtime and a TensorRT optimisation profile handle best.

Exporter: torch's dynamo exporter (`torch.export` + onnxscript). It gives a graph whose only
symbolic dimension is `tiles` (every other shape is static, no Shape/Gather chains computing
reshape targets as the TorchScript exporter emits), with weights as initializers already laid
out for `MatMul` — the form the FP16 cast pass and the Q/DQ pass of `eyecare_edge.calibration`
rewrite, and that TensorRT parses without shape plugins. It emits opset 18 natively; asking it for
17 runs onnx's version converter, which fails on the ReduceMean of the dense connector, so 18 is
the floor (TensorRT 10.x, JetPack 6 included, parses opset 18).

Attention is rewritten after export so the query is scaled before Q·Kᵀ (`onnx_attention`): the
form TensorRT fuses into one attention kernel once the FP16 pass leaves Softmax in FP16.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from eyecare_edge.export.onnx_attention import prescale_attention_queries
from torch import nn

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
TILE_AXIS = "tiles"
MIN_OPSET = 18
# Above this many bytes of weights an ONNX file keeps them in one `<name>.data` file beside it
# (protobuf cannot serialise a message of 2 GiB or more).
EXTERNAL_DATA_THRESHOLD = 2**31


class VisionEncoder(nn.Module):
    """`encode_tiles` as a module holding only the vision parts, so no LLM weight enters the graph."""

    def __init__(self, vision_tower: nn.Module, connector: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.connector = connector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector(self.vision_tower(pixel_values))


def vision_encoder(model: nn.Module) -> VisionEncoder:
    """The exported module of an EyecareGPT model, in float32 (a bf16/fp16 checkpoint is copied up)."""
    enc = VisionEncoder(model.vision_tower, model.connector).eval()
    if any(p.dtype != torch.float32 for p in enc.parameters()):
        enc = copy.deepcopy(enc).float()
    return enc


def graph_metadata(model: nn.Module) -> dict[str, str]:
    """What the runtime needs to know about the graph without running it, stored in the ONNX."""
    cfg = model.config
    pre = cfg.preprocess_config()
    return {
        "eyecare.graph": "vision",
        "eyecare.tile_size": str(pre.tile_size),
        "eyecare.tokens_per_tile": str(pre.tokens_per_tile),
        "eyecare.embed_dim": str(cfg.text_config.hidden_size),
        "eyecare.vision_layers": str(cfg.vision_config.num_hidden_layers),
        "eyecare.precision": "fp32",
    }


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (and Constant tensors), as stored — what the 2 GB limit is about."""
    total = 0
    for t in model.graph.initializer:
        total += _tensor_nbytes(t)
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += _tensor_nbytes(a.t)
    return total


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def data_file_name(onnx_path: str | Path) -> str:
    """Name of the one external-data file of `onnx_path` (`vision_fp32.onnx` -> `vision_fp32.onnx.data`)."""
    return Path(onnx_path).name + ".data"


def save_onnx(
    model: onnx.ModelProto, path: str | Path, *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> Path:
    """Write `model`; weights go to one `<name>.data` file when they exceed the threshold.

    A stale data file from an earlier save is removed when this save does not need one, so a
    bundle never carries an orphan. Note: saving with external data moves the tensors of
    `model` out of the proto (onnx's behaviour); do not reuse `model` afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(data_file_name(path))
    if data.exists():
        data.unlink()
    if tensor_bytes(model) > external_data_threshold:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def onnx_files(path: str | Path) -> list[Path]:
    """The file itself and its external-data file if it has one: what a bundle must carry."""
    path = Path(path)
    data = path.with_name(data_file_name(path))
    return [path, data] if data.exists() else [path]


def _sample_tiles(model: nn.Module, n: int) -> torch.Tensor:
    s = model.config.preprocess_config().tile_size
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1


def export_vision_onnx(
    model: nn.Module,
    out_path: str | Path,
    *,
    opset: int = MIN_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    sample_tiles: int = 2,
) -> Path:
    """Export `model.encode_tiles` as FP32 ONNX at `out_path` (plus `<name>.data` when large).

    `sample_tiles` is the tile count of the tracing input; it must be >= 2 so the exporter cannot
    specialise the tile axis to 1. The graph is checked by onnx's checker before returning.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: the dynamo exporter emits opset {MIN_OPSET}+ "
            f"(its down-conversion fails on ReduceMean); use opset >= {MIN_OPSET}"
        )
    if sample_tiles < 2:
        raise ValueError("sample_tiles must be >= 2 so the tile axis stays dynamic")
    out_path = Path(out_path)
    enc = vision_encoder(model)
    x = _sample_tiles(model, sample_tiles)
    tiles = torch.export.Dim(TILE_AXIS, min=1)
    # The exporter prints progress lines to stdout; a library should not.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            enc,
            (x,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: tiles}},
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    del program
    _name_tile_axis(proto)
    _name_nodes(proto)
    _strip_exporter_metadata(proto)
    prescaled = prescale_attention_queries(proto)
    onnx.helper.set_model_props(
        proto, {**_props(proto), **graph_metadata(model), "eyecare.attention_prescaled": str(prescaled)}
    )
    save_onnx(proto, out_path, external_data_threshold=external_data_threshold)
    onnx.checker.check_model(os.fspath(out_path))
    return out_path


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _name_tile_axis(model: onnx.ModelProto) -> None:
    """Input and output axis 0 is called `tiles`; the rest must be static."""
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        dims[0].ClearField("dim_value")
        dims[0].dim_param = TILE_AXIS
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                raise RuntimeError(f"{vi.name}: exported with a symbolic dimension besides the tile axis")


def _strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node notes (Python stack traces with this machine's paths, FX
    node names): ~60 KB per SigLIP layer that no runtime reads. Model-level props are kept."""
    g = model.graph
    for item in (*g.node, *g.value_info, *g.input, *g.output, *g.initializer):
        del item.metadata_props[:]
    del g.metadata_props[:]


def _name_nodes(model: onnx.ModelProto) -> None:
    """Every node gets a unique name: the Q/DQ pass and error messages refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def save_image_newline(model: nn.Module, out_path: str | Path) -> Path:
    """`image_newline` as float32 [d] `.npy` (no pickle): the host-side layout appends it per row."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    vec = model.image_newline.detach().float().cpu().numpy().astype(np.float32)
    if vec.ndim != 1:
        raise ValueError(f"image_newline must be a vector, got shape {vec.shape}")
    np.save(out_path, vec, allow_pickle=False)
    return out_path
