"""LoRA layer, injection, several resident adapters, merge/unmerge."""

from __future__ import annotations

import pytest
import torch

from wesam.adapters.lora import (
    LoraConfig,
    adapter_names,
    adapter_state,
    add_adapter,
    delete_adapter,
    load_adapter_state,
    lora_layers,
    merge_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    use_adapter,
)
from wesam.sam.zoo import resolve_model


def _randomise(sam, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(sam):
            for key in layer.keys_of(name):
                w = layer.lora_B[key].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)


@pytest.fixture()
def sam():
    return resolve_model("sam-micro", seed=0).sam


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_new_adapter_is_identity_and_params_count(sam, x) -> None:
    base = sam.image_encoder(x)
    add_adapter(sam, "a", LoraConfig(rank=4))
    set_adapter(sam, "a")
    torch.testing.assert_close(sam.image_encoder(x), base)
    params = trainable_parameters(sam, "a")
    dim, depth = 32, 2
    assert sum(p.numel() for p in params) == depth * 2 * (dim * 4 + 4 * dim)  # q and v, A and B
    assert all(not p.requires_grad for n, p in sam.named_parameters() if "lora_" not in n)


def test_only_q_and_v_slices_change(sam) -> None:
    add_adapter(sam, "a", LoraConfig(rank=2, targets=("q", "v")))
    _randomise(sam, "a", 1)
    layer = sam.image_encoder.blocks[0].attn.qkv
    inp = torch.randn(5, 32)
    base = layer.base(inp)
    layer.active = "a"
    out = layer(inp)
    assert not torch.allclose(out[:, :32], base[:, :32])  # q
    torch.testing.assert_close(out[:, 32:64], base[:, 32:64])  # k untouched
    assert not torch.allclose(out[:, 64:], base[:, 64:])  # v


def test_merge_unmerge_are_inverses(sam, x) -> None:
    w0 = {n: p.detach().clone() for n, p in sam.named_parameters()}
    add_adapter(sam, "a", LoraConfig(rank=3, targets=("q", "k", "v", "proj", "mlp1", "mlp2")))
    _randomise(sam, "a", 2)
    set_adapter(sam, "a")
    unmerged = sam.image_encoder(x)
    merge_adapter(sam, "a")
    torch.testing.assert_close(sam.image_encoder(x), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_adapter(sam)
    torch.testing.assert_close(sam.image_encoder(x), unmerged, atol=1e-5, rtol=1e-5)
    for n, p in sam.named_parameters():
        key = n.replace(".base.", ".")
        if key in w0:
            torch.testing.assert_close(p, w0[key], atol=1e-6, rtol=0)
    set_adapter(sam, None)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapter(sam, "a")
        merge_adapter(sam, "a")


def test_several_adapters_switch_per_call(sam, x) -> None:
    base = sam.image_encoder(x)
    add_adapter(sam, "polyp", LoraConfig(rank=2))
    add_adapter(sam, "skin", LoraConfig(rank=4, targets=("q", "v", "proj")))
    _randomise(sam, "polyp", 3)
    _randomise(sam, "skin", 4)
    with use_adapter(sam, "polyp"):
        yp = sam.image_encoder(x)
    with use_adapter(sam, "skin"):
        ys = sam.image_encoder(x)
    torch.testing.assert_close(sam.image_encoder(x), base)  # context restored the base
    assert not torch.allclose(yp, ys) and not torch.allclose(yp, base)
    with use_adapter(sam, "polyp"):
        torch.testing.assert_close(sam.image_encoder(x), yp)
    delete_adapter(sam, "skin")
    assert adapter_names(sam) == ["polyp"]
    with pytest.raises(KeyError):
        set_adapter(sam, "skin")


def test_state_round_trip(sam, x) -> None:
    add_adapter(sam, "a", LoraConfig(rank=2))
    _randomise(sam, "a", 5)
    state = {k: v.clone() for k, v in adapter_state(sam, "a").items()}
    assert all(".lora_A" in k or ".lora_B" in k for k in state)
    other = resolve_model("sam-micro", seed=0).sam
    add_adapter(other, "b", LoraConfig(rank=2))
    load_adapter_state(other, "b", state)
    with use_adapter(sam, "a"), use_adapter(other, "b"):
        torch.testing.assert_close(other.image_encoder(x), sam.image_encoder(x))
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(other, "b", bad)


def test_gradients_reach_only_lora(sam, x) -> None:
    add_adapter(sam, "a", LoraConfig(rank=2))
    params = trainable_parameters(sam, "a")
    _randomise(sam, "a", 6)
    set_adapter(sam, "a")
    sam.image_encoder(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in sam.named_parameters() if "lora_" not in n)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("q", "z"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig.from_json(LoraConfig(blocks=(0,)).to_json()) == LoraConfig(blocks=(0,))
