"""LoRA on the mask decoder: injection, state layout, exact merge, and serving with the adapter's own decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import make_base, make_image, publish_adapter, randomise_lora_b, reference_model

from wesam.adapters.adapt.trainer import AdaptConfig
from wesam.adapters.lora import (
    DECODER_TARGETS,
    DEFAULT_ADAPT_TARGETS,
    TARGETS,
    LoraConfig,
    LoraLinear,
    adapter_state,
    add_adapter,
    merge_and_unload,
    merged_decoder,
    set_adapter,
    use_adapter,
)
from wesam.cli import DEFAULT_LORA_TARGETS, LORA_TARGET_CHOICES
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import resolve_model
from wesam.service.config import ServeConfig
from wesam.service.engine import SegmentEngine
from wesam.service.messages import InferItem, PromptArrays

DEC = ("q", "v", "dec_q", "dec_k", "dec_v", "dec_out")
BOX = np.array([[8, 6, 50, 40]], np.float32)


def _decode(sam, x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        emb = sam.image_encoder(x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return low


@pytest.fixture()
def micro():
    return resolve_model("sam-micro", seed=0)


def test_cli_choices_are_the_lora_targets() -> None:
    assert tuple(LORA_TARGET_CHOICES) == tuple(TARGETS)
    # `wesam adapt`'s default targets: the encoder's q, v and the whole decoder, in both spellings
    assert tuple(DEFAULT_LORA_TARGETS) == DEFAULT_ADAPT_TARGETS == AdaptConfig.lora_targets
    assert LoraConfig(targets=DEFAULT_ADAPT_TARGETS).adapts_decoder and not LoraConfig().adapts_decoder
    assert set(DECODER_TARGETS) <= set(TARGETS)


def test_decoder_targets_wrap_every_decoder_attention(micro) -> None:
    sam = micro.sam
    add_adapter(sam, "enc", LoraConfig(rank=2))
    enc_keys = set(adapter_state(sam, "enc"))
    assert enc_keys and all(k.startswith("image_encoder.blocks.") for k in enc_keys)  # the layout older adapters have
    assert not any(isinstance(m, LoraLinear) for m in sam.mask_decoder.modules())
    add_adapter(sam, "dec", LoraConfig(rank=2, targets=DEC))
    assert LoraConfig(targets=DEC).adapts_decoder and not LoraConfig().adapts_decoder
    state = adapter_state(sam, "dec")
    decoder_keys = sorted(k for k in state if k.startswith("mask_decoder."))
    # sam-micro's decoder: per two-way layer three attentions, plus the final one; 4 targets, A and B each.
    n_attn = 3 * len(sam.mask_decoder.transformer.layers) + 1
    assert len(decoder_keys) == n_attn * 4 * 2
    assert "mask_decoder.transformer.final_attn_token_to_image.out_proj.dec_out.lora_B" in decoder_keys
    # The token-to-image projections are narrower (downsampled attention): B covers the whole output.
    b = state["mask_decoder.transformer.final_attn_token_to_image.q_proj.dec_q.lora_B"]
    assert b.shape[0] == sam.mask_decoder.transformer.final_attn_token_to_image.q_proj.base.out_features
    assert set(k for k in state if k.startswith("image_encoder.")) == enc_keys  # same encoder layout
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("dec_qkv",))


def test_decoder_lora_starts_at_zero_changes_the_decoder_and_merges_exactly(micro) -> None:
    sam = micro.sam
    x, box = torch.randn(1, 3, micro.config.img_size, micro.config.img_size), torch.tensor([[10., 12., 40., 50.]])
    base = _decode(sam, x, box)
    add_adapter(sam, "dec", LoraConfig(rank=2, targets=("dec_q", "dec_v", "dec_out")))
    with use_adapter(sam, "dec"):
        assert torch.equal(_decode(sam, x, box), base)  # B = 0
    randomise_lora_b(sam, "dec", seed=0, scale=0.5)
    with use_adapter(sam, "dec"):
        adapted = _decode(sam, x, box)
    # Decoder-only adapter: the embedding is the base one, yet the masks move.
    assert (adapted - base).abs().max() > 1e-2
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    plain = merge_and_unload(sam, micro.config, "dec")
    torch.testing.assert_close(_decode(plain, x, box), adapted, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())  # left bit for bit as found


def test_merged_decoder_is_a_plain_copy_of_the_adapted_decoder(micro) -> None:
    sam = micro.sam
    add_adapter(sam, "dec", LoraConfig(rank=2, targets=DEC))
    randomise_lora_b(sam, "dec", seed=3, scale=0.5)
    x, box = torch.randn(1, 3, micro.config.img_size, micro.config.img_size), torch.tensor([[10., 12., 40., 50.]])
    with use_adapter(sam, "dec"), torch.no_grad():
        emb = sam.image_encoder(x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        want, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    decoder = merged_decoder(sam, "dec")
    assert not any(isinstance(m, LoraLinear) for m in decoder.modules())
    assert not any(p.requires_grad for p in decoder.parameters()) and not decoder.training
    # The copy answers for the adapter whatever adapter the resident model has active.
    set_adapter(sam, None)
    with torch.no_grad():
        got, _ = decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        base_copy, _ = merged_decoder(sam, None)(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        base, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(base_copy, base) and (got - base).abs().max() > 1e-2
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())


@pytest.fixture(scope="module")
def dec_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)  # encoder only
    publish_adapter(base, reg, "lesion", seed=2, targets=DEC, scale=1.0)
    return base, reg


def _engine(world, **over) -> SegmentEngine:
    base, reg = world
    return SegmentEngine.from_config(ServeConfig(model=str(base), registry=str(reg), threads=1, poll_seconds=0,
                                                 **over))


@pytest.mark.parametrize("over", [{}, {"merged_domains": ("lesion",)}], ids=["unmerged", "merged"])
def test_engine_decodes_with_the_adapters_own_decoder(dec_world, over) -> None:
    base, reg = dec_world
    engine = _engine(dec_world, **over)
    img = make_image()
    domains = (None, "polyp", "lesion")
    results = engine.infer([InferItem(image=img, domain=d, prompts=PromptArrays(boxes=BOX)) for d in domains])
    for res, ref in zip(results, (None, "polyp@v1", "lesion@v1")):
        assert res.error is None, res.error
        want = SamPredictorCore(reference_model(base, reg, ref).sam).predict(img, Prompts(boxes=BOX), return_logits=True)
        got = engine.infer([InferItem(image_id=res.image_id, prompts=PromptArrays(boxes=BOX), return_logits=True)])[0]
        np.testing.assert_allclose(got.logits, want.masks, atol=1e-4)
        np.testing.assert_allclose(res.scores, want.scores, atol=1e-3)
    # The lesion adapter's decoder LoRA matters: the same lesion embedding through the base decoder differs.
    lesion = engine.cache.get(results[2].image_id)
    base_pred = engine.runtime.decoder(None).decode(lesion.embedding, Prompts(boxes=BOX), return_logits=True)
    own_pred = lesion.decoder.decode(lesion.embedding, Prompts(boxes=BOX), return_logits=True)
    assert np.abs(np.asarray(own_pred.masks) - np.asarray(base_pred.masks)).max() > 1e-2  # 100x the match's tolerance


def test_base_decoding_ignores_the_adapter_active_for_encoding(dec_world) -> None:
    """Decodes run beside encodes, which switch the resident model's adapter: the base decoder must not follow."""
    base, reg = dec_world
    engine = _engine(dec_world)
    img = make_image(seed=4)
    (plain,) = engine.infer([InferItem(image=img, prompts=PromptArrays(boxes=BOX), return_logits=True)])
    entry = engine.cache.get(plain.image_id)
    name = engine.router.slots["lesion"].handle.name
    with use_adapter(engine.model.sam, name):  # what an encode for lesion does while this decode runs
        during = entry.decoder.decode(entry.embedding, Prompts(boxes=BOX), return_logits=True)
    np.testing.assert_array_equal(np.asarray(during.masks), plain.logits)


def test_onnx_runtime_exports_and_uses_the_adapters_decoder(dec_world, tmp_path: Path) -> None:
    onnx = _engine(dec_world, runtime="onnx", onnx_cache=str(tmp_path / "onnx"))
    torch_engine = _engine(dec_world)
    img = make_image()
    for domain in (None, "polyp", "lesion"):
        item = dict(image=img, domain=domain, prompts=PromptArrays(boxes=BOX), return_logits=True)
        (got,) = onnx.infer([InferItem(**item)])
        (want,) = torch_engine.infer([InferItem(**item)])
        assert got.adapter == want.adapter and got.error is None
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-3)
    decoders = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "onnx").glob("*/*/decoder.onnx"))
    assert decoders == ["base", "lesion"]  # the encoder-only polyp adapter shares the base decoder
