"""Model runtimes: run the image encoder (per adapter) and the prompt/mask decoder (per adapter).

``TorchRuntime`` keeps one resident base model; LoRA adapters are attached to it unmerged and
switched per encoder call (``use_adapter``), or, for domains configured as hot, run from a merged
copy (``wesam.adapters.artifact.merged_sam``: zero LoRA overhead, one model copy each). ``OnnxRuntime`` runs
ONNX Runtime sessions: one merged encoder graph per adapter version (exported on first use into a
cache directory keyed by the model's and adapter's SHA-256) and one shared decoder graph (plus one
per adapter with decoder targets).

Most adapters adapt only the image encoder, and their domains share the base decoder. An adapter
with mask-decoder targets (``LoraConfig.adapts_decoder``) gets a decoder of its own: a plain,
merged copy (``merged_decoder``; about 4 M parameters) or, in ONNX, its own decoder graph.
``decoder(handle)`` names the decoder a handle's embeddings are decoded with; the engine keeps it
with each cached embedding, so a request decodes with the decoder of the adapter that made the
embedding even after that adapter is unloaded. Decoding never goes through the resident model's
LoRA layers (encoding switches their adapter under the engine's lock while decodes run beside it),
so the base decoder is a plain copy too.

Runtimes are not thread-safe for loading and encoding; the engine serialises those calls.
``ModelRuntime`` is what the engine needs of a runtime.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, Sam

from wesam.adapters.artifact import AdapterArtifact, attach_adapter
from wesam.adapters.lora import delete_adapter, merged_decoder, use_adapter
from wesam.adapters.ref import AdapterRef
from wesam.sam.predictor import ImageEmbedding, Prediction, Prompts, SamPredictorCore
from wesam.sam.transforms import SamTransform
from wesam.sam.zoo import LoadedModel

log = logging.getLogger("wesam.service")


@dataclass
class AdapterHandle:
    """A loaded adapter version, as a runtime knows it."""

    ref: AdapterRef
    name: str | None = None  # LoRA adapter name on the resident model (unmerged)
    merged: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # runtime-specific (merged predictor, session)


class Decoder(Protocol):
    """Prompts + an embedding -> masks (``SamPredictorCore``, ``OnnxSamPredictor``). Thread-safe."""

    def decode(self, emb: ImageEmbedding, prompts: Prompts, multimask: bool = False,
               return_logits: bool = False) -> Prediction: ...


class ModelRuntime(Protocol):
    """What the engine and the router use of a runtime (``TorchRuntime``, ``OnnxRuntime``)."""

    kind: str  # part of the embedding cache key
    img_size: int
    low_res_size: int  # side of the low-res mask logits the decoder takes and returns
    transform: SamTransform

    def load_adapter(self, art: AdapterArtifact, merged: bool = False) -> AdapterHandle: ...

    def unload_adapter(self, handle: AdapterHandle) -> None: ...

    def encode(self, images: Sequence[np.ndarray], handle: AdapterHandle | None) -> list[ImageEmbedding]: ...

    def decoder(self, handle: AdapterHandle | None) -> Decoder: ...

    def describe(self) -> dict[str, Any]: ...


def decoding_predictor(sam: Sam, decoder: MaskDecoder, device: str) -> SamPredictorCore:
    """A predictor that decodes with ``decoder`` (a plain copy) and ``sam``'s prompt encoder.

    Its image encoder is ``sam``'s own module (shared, not copied, never run through this
    predictor): only ``decode`` is used.
    """
    view = Sam(sam.image_encoder, sam.prompt_encoder, decoder,
               pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist())
    view.mask_threshold = sam.mask_threshold
    return SamPredictorCore(view, device)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchRuntime:
    kind = "torch"

    def __init__(self, model: LoadedModel, device: str = "auto") -> None:
        self.model = model
        self.device = resolve_device(device)
        self.predictor = SamPredictorCore(model.sam, self.device)
        self.base_decoder = decoding_predictor(model.sam, merged_decoder(model.sam, None), self.device)
        self.img_size = self.predictor.img_size
        self.low_res_size = int(model.sam.prompt_encoder.mask_input_size[0])
        self.transform = self.predictor.transform

    def load_adapter(self, art: AdapterArtifact, merged: bool = False) -> AdapterHandle:
        """Verify (hashes, base model) and load; raises ``AdapterError`` for a bad artifact."""
        if merged:
            from wesam.adapters.artifact import merged_sam

            sam = merged_sam(self.model, art)  # verifies, merges, copies out, restores the base
            predictor = SamPredictorCore(sam, self.device)
            return AdapterHandle(art.ref, merged=True, state={"predictor": predictor, "decoder": predictor})
        name = attach_adapter(self.model, art)
        handle = AdapterHandle(art.ref, name=name)
        if art.lora.adapts_decoder:
            handle.state["decoder"] = decoding_predictor(self.model.sam, merged_decoder(self.model.sam, name),
                                                         self.device)
        return handle

    def unload_adapter(self, handle: AdapterHandle) -> None:
        if handle.name is not None:
            delete_adapter(self.model.sam, handle.name)
        handle.state.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def encode(self, images: Sequence[np.ndarray], handle: AdapterHandle | None) -> list[ImageEmbedding]:
        if handle is not None and handle.merged:
            return handle.state["predictor"].encode_batch(images)
        with use_adapter(self.model.sam, handle.name if handle is not None else None):
            return self.predictor.encode_batch(images)

    def decoder(self, handle: AdapterHandle | None) -> Decoder:
        return (handle.state.get("decoder") if handle is not None else None) or self.base_decoder

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.kind, "device": self.device}


class OnnxRuntime:
    """ONNX Runtime over graphs exported from the resident model (``wesam.export.onnx_graphs``)."""

    kind = "onnx"

    def __init__(self, model: LoadedModel, cache_dir: str | os.PathLike | None = None, *,
                 providers: Sequence[str] | None = None, threads: int | None = None, simplify: bool = True) -> None:
        from wesam.export.onnx_graphs import GRAPH_CONTRACT
        from wesam.export.runtime import DEFAULT_PROVIDERS

        self.model = model
        self.providers = tuple(providers or DEFAULT_PROVIDERS)
        self.threads = threads
        self.simplify = simplify
        root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "wesam-onnx-cache"
        # The graph contract is in the name so that graphs cached by a wesam with other graph inputs
        # are exported again instead of being fed inputs they do not expect.
        self.cache_dir = root / f"{model.name}-{(model.sha256 or 'random')[:16]}-g{GRAPH_CONTRACT}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.base = self._predictor(self._graphs("base", None))
        self.img_size = model.config.img_size
        self.low_res_size = model.config.low_res_size
        self.transform = self.base.transform
        self.device = "cpu" if self.providers == ("CPUExecutionProvider",) else ",".join(self.providers)

    def _predictor(self, graphs: Path):
        from wesam.export.runtime import OnnxSamPredictor

        return OnnxSamPredictor(graphs / "encoder.onnx", graphs / "decoder.onnx", self.model.config.img_size,
                                self.model.config.low_res_size, providers=self.providers, threads=self.threads,
                                mask_threshold=float(self.model.sam.mask_threshold))

    def _graphs(self, key: str, art: AdapterArtifact | None) -> Path:
        """Directory with ``encoder.onnx`` (+ ``decoder.onnx`` for the base and for an adapter with
        decoder targets), exported once.

        Written into a staging directory and renamed into place, so a crash or a second process
        exporting the same graphs never leaves a half-written directory behind.
        """
        from wesam.adapters.artifact import WEIGHTS_FILE, merged_sam
        from wesam.export.onnx_graphs import export_decoder, export_encoder

        name = key if art is None else f"{art.domain}-{art.ref.version_dir}-{art.meta['files'][WEIGHTS_FILE][:16]}"
        final = self.cache_dir / name
        own_decoder = art is None or art.lora.adapts_decoder
        if (final / "encoder.onnx").is_file() and (not own_decoder or (final / "decoder.onnx").is_file()):
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache_dir))
        try:
            sam = merged_sam(self.model, art)  # verifies the adapter against the base model
            export_encoder(sam, staging / "encoder.onnx", simplify=self.simplify, label=f"encoder {name}")
            if own_decoder:
                export_decoder(sam, staging / "decoder.onnx", simplify=self.simplify, label=f"decoder {name}")
            del sam
            try:
                os.rename(staging, final)
            except OSError:  # another process published it first: theirs is as good as ours
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def load_adapter(self, art: AdapterArtifact, merged: bool = False) -> AdapterHandle:
        from wesam.adapters.artifact import AdapterError, verify_artifact
        from wesam.export.runtime import make_session

        report = verify_artifact(art, self.model)
        if not report["ok"]:
            raise AdapterError(f"refusing adapter {art.path}: " + "; ".join(report["problems"]))
        graphs = self._graphs("", art)
        # ONNX graphs are merged by construction; ``merged`` changes nothing here.
        if art.lora.adapts_decoder:
            predictor = self._predictor(graphs)
            return AdapterHandle(art.ref, merged=True, state={"session": predictor.encoder, "decoder": predictor})
        return AdapterHandle(art.ref, merged=True,
                             state={"session": make_session(graphs / "encoder.onnx", self.providers, self.threads)})

    def unload_adapter(self, handle: AdapterHandle) -> None:
        handle.state.clear()

    def encode(self, images: Sequence[np.ndarray], handle: AdapterHandle | None) -> list[ImageEmbedding]:
        if handle is None:
            return self.base.encode_batch(images)
        tensors, sizes = zip(*(self.transform.image_to_tensor(im) for im in images))
        x = np.ascontiguousarray(torch.stack(tensors).numpy(), dtype=np.float32)
        feats = handle.state["session"].run(None, {"image": x})[0]
        return [ImageEmbedding(torch.from_numpy(feats[i: i + 1]), (im.shape[0], im.shape[1]), sizes[i])
                for i, im in enumerate(images)]

    def decoder(self, handle: AdapterHandle | None) -> Decoder:
        return (handle.state.get("decoder") if handle is not None else None) or self.base

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.kind, "providers": list(self.providers), "graphs": str(self.cache_dir)}


def make_runtime(model: LoadedModel, kind: str, *, device: str = "auto", onnx_cache: str | None = None,
                 threads: int | None = None) -> ModelRuntime:
    if kind == "torch":
        return TorchRuntime(model, device)
    if kind == "onnx":
        providers = None
        if resolve_device(device).startswith("cuda"):
            providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
        return OnnxRuntime(model, onnx_cache, providers=providers, threads=threads)
    raise ValueError(f"unknown runtime {kind!r}; choose torch or onnx")
