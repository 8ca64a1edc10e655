"""ONNX graphs of SAM: an image encoder per domain and a prompt-encoder + mask-decoder graph.

``export.bundle`` exports one decoder shared by all domains (the base model's) and, for each
adapter with mask-decoder LoRA targets, that domain's own decoder; all take the contract below.

Shapes: B images, S = img_size (padded square input), C = prompt_embed_dim, g = S / patch_size
(embedding grid), L = 4 g (low-res mask side), N prompts per image, K points per prompt,
(H, W) = original image size.

Encoder graph  ``image`` (B, 3, S, S) float32 -> ``image_embeddings`` (B, C, g, g) float32.
    ``image`` is the preprocessed image exactly as ``SamPredictor`` / ``adapters.transforms``
    makes it: RGB, longest side resized to S (bilinear), ``(x - pixel_mean) / pixel_std``, then
    zero padding at the bottom/right to S x S.

Decoder graph (one image embedding, N prompts of K points): segment-anything's ONNX contract
(``segment_anything/utils/onnx.py``, ``scripts/export_onnx_model.py`` without
``--return-single-mask``), so clients written for the official export work unchanged:
    ``image_embeddings`` (1, C, g, g) float32
    ``point_coords``     (N, K, 2) float32   xy in the *resized input frame*, i.e. after
                                             ``ResizeLongestSide(S).apply_coords``; box corners included
    ``point_labels``     (N, K) float32      1 fg, 0 bg, -1 padding, 2 box top-left, 3 box bottom-right
    ``mask_input``       (N or 1, 1, L, L) float32  mask-prompt logits in the padded input frame
    ``has_mask_input``   (1,) float32        1 to use ``mask_input``, 0 to ignore it
    ``orig_im_size``     (2,) float32        (H, W) of the original image
  ->
    ``masks``            (N, 4, H, W) float32  mask logits at the original size (mask = logits > 0)
    ``iou_predictions``  (N, 4) float32
    ``low_res_masks``    (N, 4, L, L) float32  logits in the padded low-res frame (next mask_input)
  Mask index 0 is SAM's single-mask output (``multimask_output=False``), 1..3 the multimask outputs.
  The official graph fixes N = 1; here N is dynamic (all prompts of an image in one call).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn
from torch.nn import functional as F

from .common import progress
from .errors import DEFAULT_OPSET

# Protobuf cannot serialise a message of 2 GiB or more; stay clearly below it (ViT-H is ~2.5 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
NUM_MASK_OUTPUTS = 4
# Bumped whenever a graph's inputs or outputs change meaning, so caches of exported graphs
# (the service's --onnx-cache) never feed a graph of another contract. 2: the official decoder contract.
GRAPH_CONTRACT = 2  # SAM's mask decoder always computes 1 single + 3 multimask outputs

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                  "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


class EncoderGraph(nn.Module):
    """``image`` (B, 3, S, S) normalised + padded -> ``image_embeddings`` (B, C, g, g)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderGraph(SamOnnxModel):
    """segment-anything's own ONNX decoder module (``SamOnnxModel``, all four masks), with N dynamic.

    Reused rather than rewritten so that the exported graph keeps the official contract that
    tools built on segment-anything's export expect (its web demo, AnyLabeling, samexporter-style
    runners): prompt tokens in the resized input frame, ``orig_im_size`` float32. Two differences,
    both supersets: the prompt dimension N may exceed 1, and the resized image size is computed in
    exact integer arithmetic (below) instead of float32.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__(sam, return_single_mask=False)

    def input_size(self, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(2,) int64 (h, w) of the resized image before padding.

        ``floor(x * S / longest + 0.5)`` in exact integer arithmetic, equal to
        ``ResizeLongestSide.get_preprocess_shape`` (float64 in Python) for every size, where the
        official float32 version can be a pixel off; no float64 either, which TensorRT lacks.
        """
        size = orig_im_size.to(torch.int64)
        longest = size.max()
        return torch.div(2 * size * self.img_size + longest, 2 * longest, rounding_mode="floor")

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(N, M, L, L) low-res logits -> (N, M, H, W): upscale to S, crop the padding, resize to (H, W).

        Replaces the official method, whose crop the TorchScript tracer of current PyTorch freezes at
        the example input's size (measured: the official graph traced at 150 x 225 gives logits up to
        0.14 off at 50 x 90); this form keeps the crop dynamic (tests/test_export.py checks sizes).
        """
        input_hw = self.input_size(orig_im_size)
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_hw[0], : input_hw[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


@dataclass
class GraphInfo:
    """What one exported graph takes and returns (for manifests and Triton configs)."""

    path: Path
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    external_data: bool = False
    simplified: bool = False
    files: list[str] = field(default_factory=list)

    def to_json(self, root: Path) -> dict[str, Any]:
        return {"file": str(self.path.relative_to(root)), "files": self.files, "inputs": self.inputs,
                "outputs": self.outputs, "external_data": self.external_data, "simplified": self.simplified}


def _dummy_encoder_inputs(sam: Sam) -> tuple[torch.Tensor]:
    s = int(sam.image_encoder.img_size)
    return (torch.randn(2, 3, s, s),)


def _dummy_decoder_inputs(sam: Sam) -> tuple[torch.Tensor, ...]:
    c = sam.prompt_encoder.embed_dim
    g = sam.prompt_encoder.image_embedding_size[0]
    low = sam.prompt_encoder.mask_input_size[0]
    # N=3, K=4 and a mask batch of 1: sizes that differ from each other and from 1 so the tracer
    # cannot confuse or specialise the dynamic dims.
    return (torch.randn(1, c, g, g), torch.rand(3, 4, 2) * 50, torch.tensor([[1.0, 0, 2, 3]] * 3),
            torch.randn(1, 1, low, low), torch.tensor([1.0]), torch.tensor([60.0, 80.0]))


def _io_spec(model: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Names -> {dtype, shape} with symbolic dims as strings, read from an ONNX ModelProto."""
    import onnx

    def spec(values) -> dict[str, dict[str, Any]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
        return out

    return spec(model.graph.input), spec(model.graph.output)


def _initializer_bytes(model: Any) -> int:
    import onnx

    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _simplify(model: Any, label: str) -> tuple[Any, bool]:
    """Run onnxslim (constant folding, dead-node and redundant-op elimination, shape inference).

    A failure keeps the unsimplified graph, which is equally correct, and says so.
    """
    try:
        import onnxslim
    except ImportError:
        progress(f"{label}: onnxslim not installed; keeping the unsimplified graph")
        return model, False
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # a simplifier bug must not lose an otherwise valid export
        progress(f"{label}: onnxslim failed ({type(e).__name__}: {e}); keeping the unsimplified graph")
        return model, False
    if slim is None:
        progress(f"{label}: onnxslim returned nothing; keeping the unsimplified graph")
        return model, False
    return slim, True


def _save(model: Any, path: Path) -> tuple[bool, list[str]]:
    """Save a ModelProto; weights go to ``<name>.data`` beside it when too big for protobuf."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if _initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return True, [path.name, data.name]
    onnx.save_model(model, str(path))
    return False, [path.name]


def _set_output_shapes(model: Any, shapes: dict[str, list[int | str]]) -> None:
    """Name the output dims ourselves: the tracer and shape inference leave opaque symbols
    (e.g. ``Resizemasks_dim_1`` for the constant 4) that Triton configs and clients cannot use."""
    for out in model.graph.output:
        if out.name in shapes:
            dims = out.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[out.name]:
                new = dims.add()
                if isinstance(d, int):
                    new.dim_value = d
                else:
                    new.dim_param = d


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int, simplify: bool,
            label: str, output_shapes: dict[str, list[int | str]]) -> GraphInfo:
    import onnx

    module.eval()
    with tempfile.TemporaryDirectory(prefix="wesam-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript-based exporter is used on purpose: it exports data-dependent output
            # sizes (masks at (H, W) read from orig_im_size) that torch.export cannot express
            # without unbacked-symbol workarounds. Its deprecation and tracer warnings are noise here.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        model = onnx.load(str(raw))  # also reads per-tensor external files of >2 GB exports
    simplified = False
    if simplify:
        progress(f"{label}: simplifying with onnxslim")
        model, simplified = _simplify(model, label)
    _set_output_shapes(model, output_shapes)
    external, files = _save(model, path)
    inputs, outputs = _io_spec(model)
    return GraphInfo(path=path, inputs=inputs, outputs=outputs, external_data=external, simplified=simplified,
                     files=files)


def export_encoder(sam: Sam, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, simplify: bool = True,
                   label: str = "encoder") -> GraphInfo:
    """Export ``sam.image_encoder`` with a dynamic batch dimension."""
    progress(f"{label}: tracing the image encoder ({sam.image_encoder.img_size} px) to {path}")
    c = sam.prompt_encoder.embed_dim
    g = sam.prompt_encoder.image_embedding_size[0]
    return _export(EncoderGraph(sam), _dummy_encoder_inputs(sam), Path(path), ENCODER_INPUTS, ENCODER_OUTPUTS,
                   {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}, opset, simplify, label,
                   {"image_embeddings": ["batch", c, g, g]})


def export_decoder(sam: Sam, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, simplify: bool = True,
                   label: str = "decoder") -> GraphInfo:
    """Export prompt encoder + mask decoder with dynamic prompts, points, mask batch and image size."""
    progress(f"{label}: tracing the prompt encoder + mask decoder to {path}")
    axes = {
        "point_coords": {0: "num_prompts", 1: "num_points"},
        "point_labels": {0: "num_prompts", 1: "num_points"},
        "mask_input": {0: "num_mask_inputs"},
        "masks": {0: "num_prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "num_prompts"},
        "low_res_masks": {0: "num_prompts"},
    }
    low = sam.prompt_encoder.mask_input_size[0]
    m = NUM_MASK_OUTPUTS
    shapes: dict[str, list[int | str]] = {"masks": ["num_prompts", m, "height", "width"],
                                          "iou_predictions": ["num_prompts", m],
                                          "low_res_masks": ["num_prompts", m, low, low]}
    return _export(DecoderGraph(sam), _dummy_decoder_inputs(sam), Path(path), DECODER_INPUTS, DECODER_OUTPUTS,
                   axes, opset, simplify, label, shapes)
