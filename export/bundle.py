"""An ONNX export directory: per-domain encoder graphs, decoder graphs, ``export.json``.

Layout::

    DIR/export.json                 manifest (models, adapters, graphs, preprocessing)
    DIR/encoder_<domain>.onnx       one per domain; "base" is the model without adapter
    DIR/encoder_<domain>.onnx.data  weights, only for models too large for one protobuf (ViT-H)
    DIR/decoder.onnx                prompt encoder + mask decoder of the base model, shared by every
                                    domain whose adapter adapts the image encoder only
    DIR/decoder_<domain>.onnx       only for a domain whose adapter has mask-decoder LoRA targets
                                    (``LoraConfig.adapts_decoder``): that domain's merged decoder
    DIR/adapters/<domain>/          copy of each exported adapter artifact (provenance, check)

Manifest: ``"encoders"`` maps every domain to its encoder graph, ``"decoder"`` is the shared
decoder graph, and ``"decoders"`` (present only when some domain has its own decoder) maps such
domains to their decoder graphs. ``ExportBundle.decoder_path_for(domain)`` picks the right one.
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from wesam.adapters.artifact import META_FILE, WEIGHTS_FILE, AdapterArtifact, merged_sam, read_artifact
from wesam.adapters.lora import LoraConfig
from wesam.sam.transforms import PIXEL_MEAN, PIXEL_STD
from wesam.sam.zoo import LoadedModel, sha256_file

from .common import ExportError, progress, read_json, staged_output, utc_now, wesam_version, write_json
from .errors import DEFAULT_OPSET
from .onnx_graphs import NUM_MASK_OUTPUTS, export_decoder, export_encoder

EXPORT_FILE = "export.json"
FORMAT = "wesam-onnx"
# 2: the decoder takes segment-anything's official contract (input-frame coordinates, float32
# orig_im_size); version 1 graphs took original pixels and int64, so they are refused, not misread.
FORMAT_VERSION = 2
# 3: some domains have their own decoder graph ("decoders"). Written only then, so that exports of
# encoder-only adapters stay version 2 byte for byte, while a wesam that predates per-domain
# decoders refuses such an export instead of silently decoding every domain with the base decoder.
DECODERS_FORMAT_VERSION = 3
READ_VERSIONS = (FORMAT_VERSION, DECODERS_FORMAT_VERSION)
BASE_DOMAIN = "base"
DECODER_FILE = "decoder.onnx"


def encoder_file(domain: str) -> str:
    return f"encoder_{domain}.onnx"


def decoder_file(domain: str) -> str:
    """File of the decoder graph of a domain whose adapter adapts the mask decoder."""
    return f"decoder_{domain}.onnx"


@dataclass
class ExportBundle:
    """A validated export directory."""

    root: Path
    manifest: dict[str, Any]

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["encoders"])

    def encoder_path(self, domain: str) -> Path:
        if domain not in self.manifest["encoders"]:
            raise ExportError(f"no encoder for domain {domain!r} in {self.root}; have {', '.join(self.domains)}")
        return self.root / self.manifest["encoders"][domain]["file"]

    @property
    def decoder_path(self) -> Path:
        """The shared decoder (the base model's); see ``decoder_path_for`` to decode a domain."""
        return self.root / self.manifest["decoder"]["file"]

    @property
    def decoders(self) -> dict[str, dict[str, Any]]:
        """Domains with their own decoder graph -> that graph's manifest entry (often empty)."""
        return self.manifest.get("decoders") or {}

    def has_own_decoder(self, domain: str) -> bool:
        return domain in self.decoders

    def decoder_graph(self, domain: str) -> dict[str, Any]:
        """Manifest entry of the decoder graph that ``domain`` must decode with."""
        self.encoder_path(domain)  # an unknown domain must not fall back to the shared decoder
        return self.decoders.get(domain) or self.manifest["decoder"]

    def decoder_path_for(self, domain: str) -> Path:
        """The decoder graph for ``domain``: its own when its adapter adapts the mask decoder, else
        the shared one."""
        return self.root / self.decoder_graph(domain)["file"]

    @property
    def img_size(self) -> int:
        return int(self.manifest["preprocessing"]["img_size"])

    @property
    def low_res_size(self) -> int:
        return int(self.manifest["low_res_size"])

    @property
    def mask_threshold(self) -> float:
        return float(self.manifest.get("mask_threshold", 0.0))

    @property
    def base_model(self) -> dict[str, Any]:
        return self.manifest["base_model"]

    def adapter(self, domain: str) -> AdapterArtifact | None:
        """The copy of the adapter exported for ``domain``, re-hashed against the manifest."""
        entry = self.manifest["encoders"][domain].get("adapter")
        if entry is None:
            return None
        art = read_artifact(self.root / entry["copy"])
        got = sha256_file(art.path / WEIGHTS_FILE)
        if got != entry["sha256"]:
            raise ExportError(f"{art.path / WEIGHTS_FILE} SHA-256 {got} differs from {EXPORT_FILE} "
                              f"({entry['sha256']}): the adapter copy was modified")
        return art


def read_export(path: str | os.PathLike) -> ExportBundle:
    """Open an export directory, checking the manifest and that every listed file exists."""
    root = Path(path)
    manifest = read_json(root / EXPORT_FILE, "wesam ONNX export directory")
    if manifest.get("format") == FORMAT and manifest.get("format_version") == 1:
        raise ExportError(f"{root / EXPORT_FILE}: an export of an older wesam whose decoder takes prompts in "
                          "original pixels and an int64 orig_im_size; export again (`wesam export onnx`) to get "
                          "segment-anything's decoder contract")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READ_VERSIONS:
        raise ExportError(f"{root / EXPORT_FILE}: not a {FORMAT} manifest of version "
                          f"{' or '.join(map(str, READ_VERSIONS))} "
                          f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})")
    for name in graph_files(manifest):
        if not (root / name).is_file():
            raise ExportError(f"{root}: {name} listed in {EXPORT_FILE} is missing")
    if not manifest.get("encoders") or not manifest.get("decoder"):
        raise ExportError(f"{root / EXPORT_FILE}: no encoder or no decoder listed")
    _check_decoders(root, manifest)
    return ExportBundle(root, manifest)


def graph_files(manifest: dict[str, Any]) -> list[str]:
    """Every file of every graph listed in an ``export.json`` (encoders, shared and own decoders)."""
    graphs = [*manifest.get("encoders", {}).values(), manifest.get("decoder") or {},
              *(manifest.get("decoders") or {}).values()]
    return [name for g in graphs for name in g.get("files", [])]


def _check_decoders(root: Path, manifest: dict[str, Any]) -> None:
    """Every domain whose adapter adapts the mask decoder has its own decoder, and only such domains.

    Decoding such a domain with the shared decoder would run without its decoder LoRA: masks that
    look plausible but are not the adapter's. So a manifest that would lead there is refused.
    """
    encoders, decoders = manifest["encoders"], manifest.get("decoders") or {}
    for domain, entry in encoders.items():
        adapter = entry.get("adapter")
        try:
            adapts_decoder = adapter is not None and LoraConfig.from_json(adapter["lora"]).adapts_decoder
        except (KeyError, TypeError, ValueError) as e:  # e.g. targets this wesam does not know
            raise ExportError(f"{root / EXPORT_FILE}: domain {domain!r}: unreadable LoRA config ({e})") from None
        if adapts_decoder and domain not in decoders:
            raise ExportError(f"{root / EXPORT_FILE}: the adapter of domain {domain!r} adapts the mask decoder "
                              "but no decoder graph of its own is listed; export again (`wesam export onnx`)")
        if not adapts_decoder and domain in decoders:
            raise ExportError(f"{root / EXPORT_FILE}: domain {domain!r} lists its own decoder but its adapter "
                              "does not adapt the mask decoder")
    unknown = sorted(set(decoders) - set(encoders))
    if unknown:
        raise ExportError(f"{root / EXPORT_FILE}: decoders listed for unknown domains {', '.join(unknown)}")


def export_onnx(model: LoadedModel, adapters: Sequence[AdapterArtifact], out_dir: str | os.PathLike, *,
                include_base: bool = True, opset: int = DEFAULT_OPSET, simplify: bool = True) -> ExportBundle:
    """Export encoders (base and/or one per adapter, merged) and the decoders to ``out_dir``.

    The shared decoder is the base model's; a domain whose adapter adapts the mask decoder also
    gets its own (``decoder_<domain>.onnx``, from the same merged model as its encoder).
    """
    domains: dict[str, AdapterArtifact | None] = {BASE_DOMAIN: None} if include_base else {}
    for art in adapters:
        if art.domain == BASE_DOMAIN:
            raise ExportError(f"adapter {art.path} has domain {BASE_DOMAIN!r}, which names the model "
                              "without adapter; rename the domain")
        if art.domain in domains:
            raise ExportError(f"two adapters for domain {art.domain!r}: export one version per domain")
        domains[art.domain] = art
    if not domains:
        raise ExportError("nothing to export: --no-base and no --adapter")
    out = Path(out_dir)
    with staged_output(out, EXPORT_FILE, "wesam ONNX export") as staging:
        encoders: dict[str, Any] = {}
        decoders: dict[str, Any] = {}
        for domain, art in domains.items():
            sam = merged_sam(model, art)
            info = export_encoder(sam, staging / encoder_file(domain), opset=opset, simplify=simplify,
                                  label=f"encoder {domain}")
            if art is not None and art.lora.adapts_decoder:
                # Decoder LoRA was folded into this merged model's mask decoder: its graph is this
                # domain's decoder, and the shared (base) decoder would drop the adaptation.
                own = export_decoder(sam, staging / decoder_file(domain), opset=opset, simplify=simplify,
                                     label=f"decoder {domain}")
                decoders[domain] = own.to_json(staging)
            del sam
            gc.collect()  # one ViT-H copy at a time
            entry = info.to_json(staging)
            entry["adapter"] = None
            if art is not None:
                copy = Path("adapters") / domain
                shutil.copytree(art.path, staging / copy)
                entry["adapter"] = {
                    "ref": str(art.ref), "domain": art.domain, "version": art.version,
                    "sha256": art.meta["files"][WEIGHTS_FILE],
                    "adapter_json_sha256": sha256_file(art.path / META_FILE),
                    "lora": art.meta["lora"], "source": str(art.path.resolve()), "copy": str(copy),
                }
            encoders[domain] = entry
        # Adapters without decoder targets leave the mask decoder as it is in the base model, so one
        # decoder (the base model's) serves all of their domains; the others got their own above.
        dec = export_decoder(model.sam, staging / DECODER_FILE, opset=opset, simplify=simplify)
        manifest = {
            "format": FORMAT,
            "format_version": DECODERS_FORMAT_VERSION if decoders else FORMAT_VERSION,
            "wesam_version": wesam_version(),
            "created": utc_now(),
            "opset": opset,
            "base_model": {"name": model.name, "sha256": model.sha256, "source": model.source,
                           "config": model.config.to_json()},
            "preprocessing": {
                "img_size": model.config.img_size,
                # The constants the predictor's preprocessing uses (adapters.transforms).
                "pixel_mean": list(PIXEL_MEAN),
                "pixel_std": list(PIXEL_STD),
                "channel_order": "RGB",
                "layout": "NCHW float32",
                "resize": "longest side to img_size, bilinear (segment_anything ResizeLongestSide / PIL)",
                "normalize": "(pixel - pixel_mean) / pixel_std, pixels in [0, 255]",
                "pad": "zeros at the bottom and right, after normalisation, to img_size x img_size",
            },
            "mask_threshold": float(model.sam.mask_threshold),
            "low_res_size": model.config.low_res_size,
            "embedding": {"channels": model.config.prompt_embed_dim, "grid": model.config.embedding_size},
            "mask_outputs": {"count": NUM_MASK_OUTPUTS, "single": [0], "multimask": [1, 2, 3]},
            # What a client of decoder.onnx (and of any decoder_<domain>.onnx) must send
            # (docs/export.md "Graph signatures").
            "decoder_contract": {"follows": "segment-anything ONNX export (SamOnnxModel, all 4 masks)",
                                 "point_coords": "resized input frame (ResizeLongestSide.apply_coords)",
                                 "orig_im_size": "float32 (H, W)", "num_prompts": "dynamic"},
            "encoders": encoders,
            "decoder": dec.to_json(staging),
        }
        if decoders:  # absent otherwise: exports of encoder-only adapters keep their exact manifest
            manifest["decoders"] = decoders
        write_json(staging / EXPORT_FILE, manifest)
    own = f", the shared decoder and {len(decoders)} domain decoder(s)" if decoders else " and the decoder"
    progress(f"wrote {len(encoders)} encoder(s){own} to {out}")
    return read_export(out)
