"""SAM model zoo: architecture specs, building, and safe checkpoint loading.

A model is referred to by a zoo name (``sam-mini``, ``vit_b`` ...) or by a path to a
weights file (``.pth`` state dict in the official layout, or ``.safetensors``).
Weights are never unpickled: ``.pth`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from wesam.errors import WesamError

REPO_ROOT = Path(__file__).resolve().parents[2]  # wesam/sam/zoo.py -> repository
CHECKPOINT_DIR_ENV = "WESAM_CHECKPOINT_DIR"
MODELS_DIR_ENV = "WESAM_MODELS_DIR"


class ModelLoadError(WesamError, RuntimeError):
    """A model could not be built or its weights could not be loaded."""

    kind = "model_load"


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM-family model (all sizes in pixels or channels)."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for official SAM)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-res mask logits and of mask prompts (256 for SAM)."""
        return 4 * self.embedding_size

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SamConfig":
        d = dict(d)
        d["encoder_global_attn_indexes"] = tuple(d["encoder_global_attn_indexes"])
        return cls(**d)


@dataclass(frozen=True)
class ModelSpec:
    """A named zoo entry."""

    name: str
    config: SamConfig
    description: str
    official_filename: str | None = None
    official_sha256: str | None = None
    embedded: str | None = None  # weights file shipped in models/, relative to the models dir
    random_init: bool = False  # test-only models with no weights
    aliases: tuple[str, ...] = field(default=())


_VIT_B = SamConfig()
_VIT_L = replace(_VIT_B, encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                 encoder_global_attn_indexes=(5, 11, 17, 23))
_VIT_H = replace(_VIT_B, encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                 encoder_global_attn_indexes=(7, 15, 23, 31))
SAM_MINI = SamConfig(img_size=256, patch_size=16, encoder_embed_dim=192, encoder_depth=6,
                     encoder_num_heads=3, encoder_global_attn_indexes=(2, 5), window_size=8)
SAM_MICRO = SamConfig(img_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2,
                      encoder_num_heads=2, encoder_global_attn_indexes=(1,), window_size=4,
                      prompt_embed_dim=32, mask_in_chans=4, decoder_depth=1, decoder_mlp_dim=64,
                      decoder_num_heads=2, iou_head_hidden_dim=32)

ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("vit_b", _VIT_B, "Official SAM ViT-B (91M encoder params), 1024 px",
                  "sam_vit_b_01ec64.pth",
                  "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        ModelSpec("vit_l", _VIT_L, "Official SAM ViT-L (308M encoder params), 1024 px",
                  "sam_vit_l_0b3195.pth",
                  "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        ModelSpec("vit_h", _VIT_H, "Official SAM ViT-H (632M encoder params), 1024 px",
                  "sam_vit_h_4b8939.pth",
                  "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                  aliases=("default",)),
        ModelSpec("sam-mini", SAM_MINI,
                  "wesam's own SAM-architecture model at 256 px (trained by `wesam pretrain`)",
                  embedded="sam-mini/sam-mini.safetensors"),
        ModelSpec("sam-micro", SAM_MICRO, "Tiny random-init SAM at 64 px, for unit tests only",
                  random_init=True),
    )
}
_ALIASES = {a: s.name for s in ZOO.values() for a in s.aliases}


def models_dir() -> Path:
    """Where embedded weights live (``models/`` in the repository unless overridden)."""
    return Path(os.environ.get(MODELS_DIR_ENV, REPO_ROOT / "models"))


def build_sam(config: SamConfig) -> Sam:
    """Instantiate an (uninitialised-weights) SAM from ``segment_anything`` classes."""
    c = config
    grid = c.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.encoder_depth,
            embed_dim=c.encoder_embed_dim,
            img_size=c.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c.encoder_num_heads,
            patch_size=c.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=c.encoder_global_attn_indexes,
            window_size=c.window_size,
            out_chans=c.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(c.img_size, c.img_size),
            mask_in_chans=c.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=c.decoder_depth,
                embedding_dim=c.prompt_embed_dim,
                mlp_dim=c.decoder_mlp_dim,
                num_heads=c.decoder_num_heads,
            ),
            transformer_dim=c.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A ready-to-use SAM plus what identifies it (name, config, weights hash)."""

    sam: Sam
    name: str
    config: SamConfig
    sha256: str | None  # of the weights file; None for random init
    source: str  # path of the weights file, or "random-init"

    @property
    def model_id(self) -> str:
        """Short identifier used in cache keys and artifact metadata."""
        return f"{self.name}:{(self.sha256 or 'random')[:12]}"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors (and safetensors metadata) without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # truncated zip, garbage bytes, pickled objects
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]} "
            "(is the file complete and a PyTorch state dict or safetensors file?)"
        ) from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} is not a state dict of tensors")
    return obj, {}


def _shape_signature(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _describe_mismatch(expected: dict[str, tuple], got: dict[str, tuple], limit: int = 5) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:limit]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:limit]})")
    if wrong:
        parts.append(
            f"{len(wrong)} shape mismatches (e.g. "
            + ", ".join(f"{k}: expected {expected[k]}, got {got[k]}" for k in wrong[:limit])
            + ")"
        )
    return "; ".join(parts)


def infer_config(sd: dict[str, torch.Tensor]) -> tuple[str, SamConfig] | None:
    """Find the zoo architecture whose parameter shapes match ``sd`` exactly."""
    got = _shape_signature(sd)
    for spec in ZOO.values():
        if _shape_signature(_reference_state(spec.config)) == got:
            return spec.name, spec.config
    return None


_REFERENCE_SHAPES: dict[SamConfig, dict[str, torch.Tensor]] = {}


def _reference_state(config: SamConfig) -> dict[str, torch.Tensor]:
    """Parameter shapes of an architecture, via the meta device (no memory, no init cost)."""
    if config not in _REFERENCE_SHAPES:
        with torch.device("meta"):
            _REFERENCE_SHAPES[config] = build_sam(config).state_dict()
    return _REFERENCE_SHAPES[config]


def _load_into(config: SamConfig, sd: dict[str, torch.Tensor], label: str, source: Path) -> Sam:
    expected = _shape_signature(_reference_state(config))
    got = _shape_signature(sd)
    if expected != got:
        raise ModelLoadError(
            f"checkpoint {source} does not match the {label} architecture: "
            + _describe_mismatch(expected, got)
        )
    sam = build_sam(config)
    sam.load_state_dict({k: v.float() for k, v in sd.items()})
    return sam.eval()


def load_checkpoint(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    expected_sha256: str | None = None,
) -> LoadedModel:
    """Load weights from a file.

    With ``name`` the file must match that zoo architecture (and, when the zoo entry is an
    official checkpoint, its published SHA-256 unless ``expected_sha256`` overrides it).
    Without ``name`` the architecture comes from the safetensors metadata or is inferred by
    matching the parameter shapes against the zoo.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    digest = sha256_file(path)
    spec = ZOO.get(_ALIASES.get(name, name)) if name else None
    if name and spec is None:
        raise ModelLoadError(f"unknown model {name!r}; known: {', '.join(ZOO)}")
    want = expected_sha256 or (spec.official_sha256 if spec else None)
    if want and digest != want:
        raise ModelLoadError(
            f"SHA-256 mismatch for {path}: expected {want} ({spec.official_filename if spec else name}), "
            f"got {digest}. The file is corrupted, incomplete or not the official checkpoint."
        )
    sd, meta = read_state_dict(path)
    if spec is not None:
        config, label = spec.config, spec.name
    elif "wesam_config" in meta:
        config, label = SamConfig.from_json(json.loads(meta["wesam_config"])), meta.get("wesam_name", path.stem)
    else:
        found = infer_config(sd)
        if found is None:
            raise ModelLoadError(
                f"cannot tell the architecture of {path}: its parameter shapes match no zoo model "
                f"({', '.join(ZOO)}) and it carries no wesam_config metadata"
            )
        label, config = found
    sam = _load_into(config, sd, label, path)
    return LoadedModel(sam=sam, name=meta.get("wesam_name", label), config=config, sha256=digest,
                       source=str(path))


def resolve_model(ref: str, checkpoint: str | os.PathLike | None = None, seed: int = 0) -> LoadedModel:
    """Load a model by zoo name or by path.

    - a path to an existing file: architecture from metadata or inferred from shapes;
    - ``sam-micro``: random init (seeded), for tests;
    - an embedded model (``sam-mini``): its weights from the models directory;
    - an official model (``vit_b``...): ``checkpoint`` or ``$WESAM_CHECKPOINT_DIR/<official file>``,
      verified against the published SHA-256.
    """
    canonical = _ALIASES.get(ref, ref)
    spec = ZOO.get(canonical)
    if spec is None:
        if Path(ref).is_file():
            return load_checkpoint(ref)
        raise ModelLoadError(
            f"unknown model {ref!r}: not a zoo name ({', '.join(ZOO)}) and not an existing file"
        )
    if checkpoint is not None:
        return load_checkpoint(checkpoint, name=canonical)
    if spec.random_init:
        torch.manual_seed(seed)
        sam = build_sam(spec.config)
        return LoadedModel(sam=sam, name=spec.name, config=spec.config, sha256=None, source="random-init")
    if spec.embedded:
        path = models_dir() / spec.embedded
        if not path.is_file():
            raise ModelLoadError(
                f"{spec.name} weights not found at {path}; train them with `wesam pretrain` "
                f"or set ${MODELS_DIR_ENV}"
            )
        loaded = load_checkpoint(path)
        loaded.name = spec.name
        return loaded
    ckpt_dir = os.environ.get(CHECKPOINT_DIR_ENV)
    candidate = Path(ckpt_dir) / spec.official_filename if ckpt_dir else None
    if candidate is None or not candidate.is_file():
        raise ModelLoadError(
            f"{spec.name} needs its official checkpoint {spec.official_filename}: pass --checkpoint PATH "
            f"or put the file in ${CHECKPOINT_DIR_ENV} (no checkpoint is downloaded automatically)"
        )
    return load_checkpoint(candidate, name=canonical)


def save_safetensors(sam: Sam, path: str | os.PathLike, *, name: str, config: SamConfig,
                     dtype: torch.dtype = torch.float32, extra_meta: dict[str, str] | None = None) -> str:
    """Write weights with the architecture in the metadata; returns the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in sam.state_dict().items()}
    meta = {"wesam_name": name, "wesam_config": json.dumps(config.to_json())}
    meta.update(extra_meta or {})
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; serving containers run as another user
    os.replace(tmp, path)
    return sha256_file(path)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(spec: ModelSpec) -> dict[str, Any]:
    """JSON-able description of a zoo entry, including whether its weights are available."""
    info: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "config": spec.config.to_json(),
        "aliases": list(spec.aliases),
    }
    with torch.device("meta"):
        sam = build_sam(spec.config)
    info["parameters"] = {
        "image_encoder": count_parameters(sam.image_encoder),
        "prompt_encoder": count_parameters(sam.prompt_encoder),
        "mask_decoder": count_parameters(sam.mask_decoder),
    }
    if spec.official_filename:
        info["official_filename"] = spec.official_filename
        info["official_sha256"] = spec.official_sha256
        ckpt_dir = os.environ.get(CHECKPOINT_DIR_ENV)
        info["available"] = bool(ckpt_dir and (Path(ckpt_dir) / spec.official_filename).is_file())
    elif spec.embedded:
        path = models_dir() / spec.embedded
        info["weights"] = str(path)
        info["available"] = path.is_file()
        manifest = path.with_name("manifest.json")
        if manifest.is_file():
            info["manifest"] = json.loads(manifest.read_text())
    else:
        info["available"] = True
        info["weights"] = "random-init"
    return info
