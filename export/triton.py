"""A Triton Inference Server model repository from an ONNX export directory.

Layout (loadable by the stock ``tritonserver`` image, no wesam code needed)::

    REPO/encoder_<domain>/config.pbtxt     ONNX Runtime backend, dynamic batching over images
    REPO/encoder_<domain>/1/model.onnx     (+ the .onnx.data weights file for >2 GB models)
    REPO/decoder/config.pbtxt              ONNX Runtime backend, max_batch_size 0 (ragged prompts)
    REPO/decoder/1/model.onnx              the shared decoder (the base model's)
    REPO/decoder_<domain>/config.pbtxt     as ``decoder``, only for a domain whose adapter adapts the
    REPO/decoder_<domain>/1/model.onnx     mask decoder (the export's decoder_<domain>.onnx)
    REPO/pipeline_<domain>/config.pbtxt    ensemble: encoder_<domain> -> decoder_<domain> if the domain
                                           has its own decoder, else -> decoder
    REPO/pipeline_<domain>/1/              (ensembles have no model file; the version dir must exist)
    REPO/wesam_triton.json                 what was built from what (ignored by Triton)

Batching: the encoder's inputs have identical non-batch dims (3, S, S), so Triton's dynamic
batcher stacks requests from many clients into one encoder run. The decoder's prompt dims
(N prompts, K points) differ from request to request, and the dynamic batcher can only
concatenate requests whose non-batch dims are equal; so the decoder uses ``max_batch_size: 0``
(each request is one image with all its N x K prompts, the graph's own dynamic dims) and
scales with instances instead. The ensembles are non-batching too; Triton allows a
non-batching ensemble to feed a batching model when the full shapes agree
([1, 3, S, S] against [-1] + [3, S, S]).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .bundle import DECODER_FILE, ExportBundle
from .common import ExportError, progress, staged_output, utc_now, wesam_version, write_json
from .onnx_graphs import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS

MARKER_FILE = "wesam_triton.json"
MODEL_FILE = "model.onnx"
DECODER_MODEL = "decoder"
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
           "bool": "TYPE_BOOL"}


def encoder_model(domain: str) -> str:
    return f"encoder_{domain}"


def pipeline_model(domain: str) -> str:
    return f"pipeline_{domain}"


def decoder_model(bundle: ExportBundle, domain: str) -> str:
    """The Triton model that decodes ``domain``: ``decoder_<domain>`` when its adapter adapts the mask
    decoder (its own graph), else the shared ``decoder``."""
    return f"{DECODER_MODEL}_{domain}" if bundle.has_own_decoder(domain) else DECODER_MODEL


def _dims(shape: Sequence[int | str]) -> list[int]:
    """ONNX dims -> Triton dims: symbolic dims become -1 (variable)."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _tensor(message, name: str, spec: dict[str, Any], drop_batch: bool) -> None:
    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ExportError(f"tensor {name}: dtype {spec['dtype']} has no Triton equivalent")
    dims = _dims(spec["shape"])
    if drop_batch:
        if dims[0] != -1:
            raise ExportError(f"tensor {name} has a fixed first dim {spec['shape'][0]}; it cannot be batched")
        dims = dims[1:]
    from tritonclient.grpc import model_config_pb2 as mc

    message.name = name
    message.data_type = mc.DataType.Value(dtype)
    message.dims.extend(dims)


def _instance_group(config, kind: str, count: int) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    group = config.instance_group.add()
    group.count = count
    group.kind = mc.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[kind])


def encoder_config(domain: str, graph: dict[str, Any], *, max_batch_size: int, queue_delay_us: int,
                   instance_kind: str, instances: int):
    """ModelConfig of one domain's encoder: batches images (dims exclude the batch dim)."""
    from tritonclient.grpc import model_config_pb2 as mc

    c = mc.ModelConfig(name=encoder_model(domain), backend="onnxruntime", max_batch_size=max_batch_size,
                       default_model_filename=MODEL_FILE)
    for name in ENCODER_INPUTS:
        _tensor(c.input.add(), name, graph["inputs"][name], drop_batch=True)
    for name in ENCODER_OUTPUTS:
        _tensor(c.output.add(), name, graph["outputs"][name], drop_batch=True)
    c.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    _instance_group(c, instance_kind, instances)
    return c


def decoder_config(graph: dict[str, Any], *, instance_kind: str, instances: int,
                   model_name: str = DECODER_MODEL):
    """ModelConfig of a decoder (the shared one, or ``decoder_<domain>``): non-batching, every dim as in
    the ONNX graph."""
    from tritonclient.grpc import model_config_pb2 as mc

    c = mc.ModelConfig(name=model_name, backend="onnxruntime", max_batch_size=0,
                       default_model_filename=MODEL_FILE)
    for name in DECODER_INPUTS:
        _tensor(c.input.add(), name, graph["inputs"][name], drop_batch=False)
    for name in DECODER_OUTPUTS:
        _tensor(c.output.add(), name, graph["outputs"][name], drop_batch=False)
    _instance_group(c, instance_kind, instances)
    return c


def pipeline_config(domain: str, encoder: dict[str, Any], decoder: dict[str, Any], *,
                    decoder_name: str = DECODER_MODEL):
    """Ensemble image + prompts -> masks: ``encoder_<domain>`` then ``decoder_name`` (the domain's
    decoder model), no Python code."""
    from tritonclient.grpc import model_config_pb2 as mc

    c = mc.ModelConfig(name=pipeline_model(domain), platform="ensemble", max_batch_size=0)
    image = dict(encoder["inputs"]["image"])
    image["shape"] = [1, *image["shape"][1:]]  # one image per request; its prompts carry the batch
    _tensor(c.input.add(), "image", image, drop_batch=False)
    for name in DECODER_INPUTS[1:]:
        _tensor(c.input.add(), name, decoder["inputs"][name], drop_batch=False)
    for name in DECODER_OUTPUTS:
        _tensor(c.output.add(), name, decoder["outputs"][name], drop_batch=False)
    enc = c.ensemble_scheduling.step.add(model_name=encoder_model(domain), model_version=-1)
    enc.input_map["image"] = "image"
    enc.output_map["image_embeddings"] = "image_embeddings"
    dec = c.ensemble_scheduling.step.add(model_name=decoder_name, model_version=-1)
    for name in DECODER_INPUTS:
        dec.input_map[name] = name
    for name in DECODER_OUTPUTS:
        dec.output_map[name] = name
    return c


def _write_config(path: Path, config) -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    # text_format leaves out proto3 defaults, so say the one that matters when it is 0.
    note = "# max_batch_size: 0 (not batched by Triton; see docs/export.md)\n" if config.max_batch_size == 0 else ""
    path.write_text(f"# generated by `wesam export triton`\n{note}"
                    + text_format.MessageToString(config, use_short_repeated_primitives=True))


def _copy_graph(bundle: ExportBundle, graph: dict[str, Any], model_dir: Path) -> None:
    """``<graph>.onnx`` -> ``<model>/1/model.onnx``; an external-data file keeps its name (the graph
    refers to it by name) and goes beside it."""
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    src = bundle.root / graph["file"]
    shutil.copyfile(src, version / MODEL_FILE)
    for name in graph["files"]:
        if name != Path(graph["file"]).name:
            shutil.copyfile(bundle.root / name, version / name)


def build_repository(bundle: ExportBundle, out: str | os.PathLike, *, domains: Sequence[str] | None = None,
                     max_batch_size: int = 8, queue_delay_us: int = 2000, instance_kind: str = "auto",
                     encoder_instances: int = 1, decoder_instances: int = 2) -> dict[str, Any]:
    """Write the repository (atomically replacing an earlier one); returns ``wesam_triton.json``."""
    if instance_kind not in INSTANCE_KINDS:
        raise ExportError(f"unknown instance kind {instance_kind!r}; choose from {', '.join(INSTANCE_KINDS)}")
    if max_batch_size < 1:
        raise ExportError("--max-batch must be >= 1 (the encoder batches images)")
    domains = list(domains or bundle.domains)
    for d in domains:
        bundle.encoder_path(d)
    out = Path(out)
    with staged_output(out, MARKER_FILE, "wesam Triton repository") as staging:
        models: dict[str, Any] = {}
        # The shared (base) decoder is always there, whatever the selected domains, so the layout
        # and a client calling ``decoder`` directly do not depend on which adapters were exported.
        decoder = bundle.manifest["decoder"]
        progress(f"triton: {DECODER_MODEL} ({DECODER_FILE})")
        _copy_graph(bundle, decoder, staging / DECODER_MODEL)
        _write_config(staging / DECODER_MODEL / "config.pbtxt",
                      decoder_config(decoder, instance_kind=instance_kind, instances=decoder_instances))
        models[DECODER_MODEL] = {"kind": "decoder", "max_batch_size": 0}
        for domain in domains:
            graph = bundle.manifest["encoders"][domain]
            name = encoder_model(domain)
            dec_name, dec_graph = decoder_model(bundle, domain), bundle.decoder_graph(domain)
            if dec_name != DECODER_MODEL:
                # The adapter adapts the mask decoder: the shared decoder would decode without it.
                progress(f"triton: {dec_name} ({dec_graph['file']})")
                _copy_graph(bundle, dec_graph, staging / dec_name)
                _write_config(staging / dec_name / "config.pbtxt",
                              decoder_config(dec_graph, instance_kind=instance_kind, instances=decoder_instances,
                                             model_name=dec_name))
                models[dec_name] = {"kind": "decoder", "domain": domain, "max_batch_size": 0}
            progress(f"triton: {name} and {pipeline_model(domain)}")
            _copy_graph(bundle, graph, staging / name)
            _write_config(staging / name / "config.pbtxt",
                          encoder_config(domain, graph, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                                         instance_kind=instance_kind, instances=encoder_instances))
            pipe = staging / pipeline_model(domain)
            (pipe / "1").mkdir(parents=True)
            _write_config(pipe / "config.pbtxt", pipeline_config(domain, graph, dec_graph, decoder_name=dec_name))
            models[name] = {"kind": "encoder", "domain": domain, "max_batch_size": max_batch_size}
            models[pipeline_model(domain)] = {"kind": "ensemble", "domain": domain, "max_batch_size": 0}
        manifest = {
            "format": "wesam-triton",
            "format_version": 1,
            "source_export": str(bundle.root.resolve()),
            "base_model": bundle.base_model,
            "domains": domains,
            "models": models,
            "preprocessing": bundle.manifest["preprocessing"],
            "wesam_version": wesam_version(),
            "created": utc_now(),
        }
        write_json(staging / MARKER_FILE, manifest)
    progress(f"wrote Triton repository {out} ({len(models)} models)")
    return manifest
