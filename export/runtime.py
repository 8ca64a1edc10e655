"""ONNX Runtime inference over an export directory, with the ``SamPredictorCore`` interface.

Used by ``wesam export check`` and the benchmark; also a reference client for the graphs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from wesam.sam.predictor import ImageEmbedding, Prediction, Prompts
from wesam.sam.transforms import SamTransform

from .prompts import decoder_feeds

if TYPE_CHECKING:  # for the annotation only: the service uses this module without export bundles
    from .bundle import ExportBundle

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def make_session(path: str | os.PathLike, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` (external data is found beside the graph)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: shape-hint warnings would drown the progress output
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


class OnnxSamPredictor:
    """Encode with one domain's encoder graph, decode with that domain's decoder graph.

    The decoder is the export's shared one unless the domain's adapter adapts the mask decoder
    (``from_bundle`` picks it with ``ExportBundle.decoder_path_for``).

    Preprocessing is done here with ``adapters.transforms.SamTransform`` (the graphs take the
    normalised, padded (B, 3, S, S) tensor); prompts are laid out by ``export.prompts``.
    """

    def __init__(self, encoder: str | os.PathLike, decoder: str | os.PathLike, img_size: int,
                 low_res_size: int, *, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int | None = None, mask_threshold: float = 0.0) -> None:
        self.encoder = make_session(encoder, providers, threads)
        self.decoder = make_session(decoder, providers, threads)
        self.img_size = img_size
        self.low_res_size = low_res_size
        self.mask_threshold = mask_threshold
        self.transform = SamTransform(img_size, low_res_size)

    @classmethod
    def from_bundle(cls, bundle: ExportBundle, domain: str, **kwargs: Any) -> "OnnxSamPredictor":
        """From an ``export.bundle.ExportBundle``; ``domain`` ("base" or an adapter's) picks the encoder
        and the decoder (its own when its adapter adapts the mask decoder, else the shared one)."""
        return cls(bundle.encoder_path(domain), bundle.decoder_path_for(domain), bundle.img_size,
                   bundle.low_res_size, mask_threshold=bundle.mask_threshold, **kwargs)

    def encode_tensor(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 preprocessed -> (B, C, g, g) float32 embeddings."""
        return self.encoder.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Several (H, W, 3) uint8 RGB images in one encoder run (dynamic batch)."""
        if not images:
            return []
        tensors, sizes = zip(*(self.transform.image_to_tensor(im) for im in images))
        feats = self.encode_tensor(torch.stack(tensors).numpy())
        return [ImageEmbedding(torch.from_numpy(feats[i: i + 1]), (im.shape[0], im.shape[1]), sizes[i])
                for i, im in enumerate(images)]

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_batch([image])[0]

    def decode_all(self, emb: ImageEmbedding, prompts: Prompts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw graph outputs: masks (N, 4, H, W) logits, iou (N, 4), low-res logits (N, 4, L, L)."""
        feeds = decoder_feeds(emb.features.numpy(), prompts, emb.original_size, self.img_size,
                              self.low_res_size)
        masks, iou, low = self.decoder.run(None, feeds)
        return masks, iou, low

    def decode(self, emb: ImageEmbedding, prompts: Prompts, multimask: bool = False,
               return_logits: bool = False) -> Prediction:
        """Same contract as ``SamPredictorCore.decode`` (mask 0 single, 1..3 multimask)."""
        masks, iou, low = self.decode_all(emb, prompts)
        sl = slice(1, None) if multimask else slice(0, 1)
        masks, iou, low = masks[:, sl], iou[:, sl], low[:, sl]
        return Prediction(masks if return_logits else masks > self.mask_threshold, iou, low)

    def predict(self, image: np.ndarray, prompts: Prompts, multimask: bool = False,
                return_logits: bool = False) -> Prediction:
        return self.decode(self.encode(image), prompts, multimask, return_logits)
