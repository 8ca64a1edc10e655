"""TensorRT engines built from an ONNX export (needs TensorRT and an NVIDIA GPU).

Each graph becomes one serialized engine (``.plan``) with one optimisation profile covering
the dynamic dims: encoder batch 1..max_batch; decoder prompts 1..max_prompts, points
1..max_points, mask batch 1..max_prompts, and ``orig_im_size`` values (a shape tensor: it sets
the output size) 1..max_image_side; the decoder engine takes ``orig_im_size`` as int64 (the ONNX
graph's float32 cannot be a TensorRT shape-tensor input, see ``integer_size_decoder``). Engines
are specific to the GPU model and TensorRT version that built them, so they are built on the
serving machine, not shipped.

Engines (``engine_plan``): ``encoder_<domain>.plan`` per selected domain, ``decoder.plan`` from
the shared decoder, and ``decoder_<domain>.plan`` for each selected domain whose adapter adapts
the mask decoder (from its ``decoder_<domain>.onnx``); each is an entry of ``engines.json``.

Precision: TensorRT 10 uses its builder flags (fp16 / bf16 kernels where faster, fp32
elsewhere). TensorRT 11 builds strongly typed networks only, so reduced precision needs the
graph converted first: done with NVIDIA ModelOpt AutoCast when it is installed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .bundle import ExportBundle
from .common import ExportError, progress, utc_now, wesam_version, write_json

PRECISIONS = ("fp16", "bf16", "fp32")
MANIFEST_FILE = "engines.json"


class TensorRTUnavailable(ExportError):
    """TensorRT or a CUDA GPU is missing: engines cannot be built on this machine."""


@dataclass(frozen=True)
class PlannedEngine:
    """One engine to build: its name (``engines.json`` key and ``<name>.plan``) and source graph."""

    name: str
    onnx: Path
    kind: str  # "encoder" or "decoder"
    domain: str | None = None  # set for a domain's own decoder


@dataclass(frozen=True)
class ProfileLimits:
    """Ranges of the dynamic dims an engine accepts (min is always 1)."""

    max_batch: int = 8
    max_prompts: int = 64
    max_points: int = 8
    max_image_side: int = 4096
    opt_batch: int = 1
    opt_prompts: int = 16
    opt_points: int = 3


def gpu_name() -> str | None:
    """Name of the first CUDA device, or None when no GPU is visible."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def require_tensorrt():
    """Import TensorRT, or stop with a message saying what is missing and what to do instead."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install 'wesam[gpu]' or pip install tensorrt, on Linux or Windows "
            "with an NVIDIA GPU and driver); the ONNX graphs run without it on ONNX Runtime") from None
    if gpu_name() is None:
        raise TensorRTUnavailable(
            f"TensorRT {getattr(trt, '__version__', '?')} is installed but no CUDA GPU is visible: engines are "
            "built on (and only run on) the GPU model that will serve them")
    return trt


def encoder_shapes(bundle: ExportBundle, limits: ProfileLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    s = bundle.img_size
    return {"image": ((1, 3, s, s), (min(limits.opt_batch, limits.max_batch), 3, s, s), (limits.max_batch, 3, s, s))}


def decoder_shapes(bundle: ExportBundle, limits: ProfileLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    low = bundle.low_res_size
    n, k = limits.max_prompts, limits.max_points
    on, ok = min(limits.opt_prompts, n), min(limits.opt_points, k)
    return {
        "point_coords": ((1, 1, 2), (on, ok, 2), (n, k, 2)),
        "point_labels": ((1, 1), (on, ok), (n, k)),
        "mask_input": ((1, 1, low, low), (1, 1, low, low), (n, 1, low, low)),
    }


def decoder_shape_values(bundle: ExportBundle, limits: ProfileLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Value ranges of shape-tensor inputs (``orig_im_size`` decides the mask output size)."""
    s, m = bundle.img_size, limits.max_image_side
    return {"orig_im_size": ((1, 1), (s, s), (m, m))}


def integer_size_decoder(onnx_path: Path, out_path: Path) -> Path:
    """``decoder.onnx`` with ``orig_im_size`` taken as int64, for TensorRT.

    The ONNX graph follows segment-anything's contract (``orig_im_size`` float32), but the input
    sets the mask output's size, which makes it a TensorRT shape tensor, and TensorRT accepts only
    integer shape tensors as engine inputs. So the engine gets an int64 input followed by a Cast to
    float32 feeding the unchanged graph; everything else is identical. Returns ``onnx_path`` itself
    when the input is already an integer.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    size_input = next((i for i in graph.input if i.name == "orig_im_size"), None)
    if size_input is None:
        raise ExportError(f"{onnx_path}: no orig_im_size input; not a wesam decoder graph")
    if size_input.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32):
        return onnx_path
    as_float = "orig_im_size_float32"
    for node in graph.node:
        node.input[:] = [as_float if name == "orig_im_size" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["orig_im_size"], [as_float], to=TensorProto.FLOAT,
                                          name="orig_im_size_to_float32"))
    size_input.type.tensor_type.elem_type = TensorProto.INT64
    onnx.checker.check_model(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_path))
    return out_path


def _convert_for_strong_typing(onnx_path: Path, precision: str, tmp: Path) -> Path:
    """TensorRT 11: reduced precision must be in the graph itself (ModelOpt AutoCast)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise TensorRTUnavailable(
            f"this TensorRT builds strongly typed networks only, so a {precision} engine needs the ONNX graph "
            "converted to mixed precision first: install nvidia-modelopt[onnx], or pass --precision fp32") from None
    import onnx

    progress(f"converting {onnx_path.name} to mixed {precision} with ModelOpt AutoCast")
    model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=precision, keep_io_types=True)
    out = tmp / onnx_path.name
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return out


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 shape_values: dict[str, tuple[tuple[int, ...], ...]], *, precision: str = "fp16",
                 workspace_gib: float = 4.0) -> dict[str, Any]:
    """Parse ``onnx_path``, build one engine with one optimisation profile, write ``engine_path``."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # removed in TensorRT 11
    used = precision
    with tempfile.TemporaryDirectory(prefix="wesam-trt-") as tmp:
        source = onnx_path
        flags = 0
        if precision != "fp32" and not weak_typing:
            source = _convert_for_strong_typing(onnx_path, precision, Path(tmp))
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file (not parse(bytes)) so that external weights beside the graph are found.
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if precision != "fp32" and weak_typing:
            if precision == "fp16" and not builder.platform_has_fast_fp16:
                progress("this GPU has no fast fp16; building fp32")
                used = "fp32"
            elif precision == "bf16" and not _bf16_supported():
                progress("this GPU has no bf16 support; building fp32")
                used = "fp32"
            else:
                config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        recorded: dict[str, Any] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            name = tensor.name
            if tensor.is_shape_tensor:
                if name not in shape_values:
                    raise ExportError(f"{onnx_path.name}: TensorRT treats input {name} as a shape tensor "
                                      "but no value range is known for it")
                profile.set_shape_input(name, *shape_values[name])
                recorded[name] = {"values": shape_values[name]}
            elif any(d < 0 for d in tensor.shape):
                if name not in shapes:
                    raise ExportError(f"{onnx_path.name}: input {name} has dynamic shape {tuple(tensor.shape)} "
                                      "but no profile range")
                profile.set_shape(name, *shapes[name])
                recorded[name] = {"shapes": shapes[name]}
        config.add_optimization_profile(profile)
        progress(f"building TensorRT engine {engine_path.name} ({used}); this takes minutes")
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build {engine_path.name}; see its messages above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return {"file": engine_path.name, "onnx": str(onnx_path), "precision": used, "profile": recorded,
            "bytes": engine_path.stat().st_size}


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def engine_plan(bundle: ExportBundle, domains: Sequence[str] | None = None) -> list[PlannedEngine]:
    """The engines ``build_engines`` builds for ``domains`` (default all), in build order.

    The selected domains' encoders, the shared decoder, then the own decoder of every selected
    domain whose adapter adapts the mask decoder: an engine from the shared decoder would decode
    such a domain without its decoder LoRA.
    """
    domains = list(domains or bundle.domains)
    for d in domains:
        bundle.encoder_path(d)  # unknown domains fail before any work
    plan = [PlannedEngine(f"encoder_{d}", bundle.encoder_path(d), "encoder") for d in domains]
    plan.append(PlannedEngine("decoder", bundle.decoder_path, "decoder"))
    plan += [PlannedEngine(f"decoder_{d}", bundle.decoder_path_for(d), "decoder", d)
             for d in domains if bundle.has_own_decoder(d)]
    return plan


def _build_decoder_engine(bundle: ExportBundle, onnx_path: Path, engine_path: Path, limits: ProfileLimits, *,
                          precision: str, workspace_gib: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wesam-trt-") as tmp:
        graph = integer_size_decoder(onnx_path, Path(tmp) / onnx_path.name)
        entry = build_engine(graph, engine_path, decoder_shapes(bundle, limits), decoder_shape_values(bundle, limits),
                             precision=precision, workspace_gib=workspace_gib)
    # Engines take everything as the ONNX graphs do except this one input (see integer_size_decoder).
    entry["onnx"] = str(onnx_path)
    entry["inputs_differing_from_onnx"] = {"orig_im_size": "int64 (TensorRT shape-tensor inputs must be integers)"}
    return entry


def build_engines(bundle: ExportBundle, out_dir: str | os.PathLike, *, domains: Sequence[str] | None = None,
                  precision: str = "fp16", limits: ProfileLimits = ProfileLimits(),
                  workspace_gib: float = 4.0) -> dict[str, Any]:
    """Engines for the selected domains' encoders and decoders (``engine_plan``), plus ``engines.json``."""
    trt = require_tensorrt()  # fail before any work when engines cannot be built here
    plan = engine_plan(bundle, domains)
    out = Path(out_dir)
    engines: dict[str, Any] = {}
    for item in plan:
        path = out / f"{item.name}.plan"
        if item.kind == "encoder":
            engines[item.name] = build_engine(item.onnx, path, encoder_shapes(bundle, limits), {},
                                              precision=precision, workspace_gib=workspace_gib)
        else:
            engines[item.name] = _build_decoder_engine(bundle, item.onnx, path, limits, precision=precision,
                                                       workspace_gib=workspace_gib)
        if item.domain is not None:
            engines[item.name]["domain"] = item.domain
    manifest = {
        "format": "wesam-tensorrt",
        "tensorrt_version": getattr(trt, "__version__", None),
        "device": gpu_name(),
        "precision": precision,
        "limits": asdict(limits),
        "source_export": str(bundle.root.resolve()),
        "base_model": bundle.base_model,
        "engines": engines,
        "wesam_version": wesam_version(),
        "created": utc_now(),
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest
