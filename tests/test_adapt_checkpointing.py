"""Activation checkpointing of the image encoder in `wesam adapt` (adapters/adapt/checkpointing.py):
the same encoder output and the same LoRA gradients with it on and off, `auto` by input size, the
setting recorded in the summary and adapter.json, and the plumbing of `wesam bench adapt-vitb` on
sam-micro (ViT-B itself never runs in the tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from adapt_support import make_adapt_setup

from wesam.adapters.adapt import checkpointing as GC
from wesam.adapters.adapt.trainer import ADAPTER, AdaptationTrainer, AdaptConfig
from wesam.adapters.lora import adapter_state, load_adapter_state
from wesam.adapters.registry import Registry
from wesam.sam.zoo import SAM_MICRO, SAM_MINI, ZOO, resolve_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_adapt_setup(tmp_path_factory.mktemp("adapt-ckpt"), n_images=6, n_train=5)


def _trainer(setup, **kw) -> AdaptationTrainer:
    tmp, root, model_path = setup
    base = {"data": str(root), "domain": "polyp", "model": str(model_path), "registry": str(tmp / "reg"),
            "steps": 1, "batch_size": 2, "eval_every": 1, "grad_clip": 0.0, "method": "wesam",
            "work_dir": str(tmp / f"w-{time.monotonic_ns()}")}
    base.update(kw)
    return AdaptationTrainer(AdaptConfig(**base), log=lambda *_: None)


def test_auto_resolves_by_input_size() -> None:
    assert GC.resolve("auto", ZOO["vit_b"].config.img_size) is True
    assert GC.resolve("auto", SAM_MINI.img_size) is False and GC.resolve("auto", SAM_MICRO.img_size) is False
    assert GC.resolve("on", 64) is True and GC.resolve("off", 1024) is False
    with pytest.raises(ValueError, match="grad-checkpointing"):
        AdaptConfig(data="d", domain="x", grad_checkpointing="yes")


def test_trainer_setting(setup) -> None:
    assert _trainer(setup).grad_checkpointing is False  # auto on sam-micro
    assert _trainer(setup, grad_checkpointing="on").grad_checkpointing is True


def test_encoder_output_identical_and_blocks_recomputed(setup) -> None:
    a = _trainer(setup)
    enc = a.sam.image_encoder
    x = torch.randn(2, 3, enc.img_size, enc.img_size, generator=torch.Generator().manual_seed(0))
    calls = []

    def counted(forward):  # module hooks do not fire during the recomputation: count forward calls
        return lambda *args, **kw: (calls.append(1), forward(*args, **kw))[1]

    for b in enc.blocks:
        b.forward = counted(b.forward)
    try:
        plain = enc(x)
        with torch.no_grad():  # no gradient: the stock forward (no checkpoint)
            assert torch.equal(GC.encode(enc, x, True), plain.detach())
        calls.clear()
        ck = GC.encode(enc, x, True)
        assert torch.equal(ck, plain)
        assert len(calls) == len(enc.blocks)
        ck.sum().backward()
        assert len(calls) == 2 * len(enc.blocks)  # each block ran again in the backward pass
    finally:
        for b in enc.blocks:
            del b.forward


def _step_grads(a: AdaptationTrainer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training step (the optimiser step is skipped)."""
    load_adapter_state(a.sam, ADAPTER, state)
    a.opt.step = lambda *_, **__: None
    a.train_step()
    return {n: p.grad.clone() for n, p in a.sam.named_parameters() if "lora_" in n and p.requires_grad}


def test_lora_gradients_equal_with_and_without_checkpointing(setup) -> None:
    off, on = _trainer(setup, grad_checkpointing="off"), _trainer(setup, grad_checkpointing="on")
    # B != 0, so that A gets a gradient too (with B = 0 only B does)
    gen = torch.Generator().manual_seed(1)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)) for k, v in adapter_state(off.sam, ADAPTER).items()}
    g_off, g_on = _step_grads(off, state), _step_grads(on, state)
    assert g_off.keys() == g_on.keys()
    # A, B of q and v in every encoder block (the decoder's LoRA, on by default, comes on top)
    assert sum(k.startswith("image_encoder.") for k in g_on) == 4 * len(on.sam.image_encoder.blocks)
    for k in g_off:
        assert g_on[k].abs().sum() > 0, k  # reached through the checkpointed blocks
        torch.testing.assert_close(g_on[k], g_off[k], atol=1e-6, rtol=1e-5)


def test_setting_recorded_in_summary_and_adapter(setup) -> None:
    a = _trainer(setup, grad_checkpointing="on")
    summary = a.run(publish=True)
    assert summary["grad_checkpointing"] is True
    meta = Registry(a.cfg.registry).resolve(summary["adapter"]).meta
    assert meta["grad_checkpointing"] is True and meta["config"]["grad_checkpointing"] == "on"
    # a resumed run may change it (it does not change the trajectory)
    again = _trainer(setup, grad_checkpointing="off", work_dir=a.cfg.work_dir, steps=2)
    assert again.resume() and again.step == 1


def test_cli_flag() -> None:
    from wesam.cli import build_parser

    args = build_parser().parse_args(["adapt", "--data", "d", "--domain", "x", "--grad-checkpointing", "on"])
    assert args.grad_checkpointing == "on"
    assert build_parser().parse_args(["adapt", "--data", "d", "--domain", "x"]).grad_checkpointing == "auto"


def test_bench_adapt_vitb_plumbing_on_sam_micro(setup, tmp_path, capsys) -> None:
    """The benchmark's path (generated official-layout .pth, real CLI subprocess, summary, RSS) on
    sam-micro; no RESULTS.md update. (One run: each costs a subprocess's start.)"""
    from wesam.bench.adapt_vitb import generate_checkpoint, main

    path, size, n_enc = generate_checkpoint("sam-micro", tmp_path)
    assert path.suffix == ".pth" and size > 0 and n_enc > 0
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(resolve_model("sam-micro").sam.state_dict())
    out = tmp_path / "bench.json"
    rc = main(["--model", "sam-micro", "--data", str(setup[1]), "--limit", "4", "--steps", "1", "--threads", "1",
               "--json", str(out), "--no-results", "--tmp-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads(out.read_text())
    (r,) = result["runs"]
    assert r["grad_checkpointing"] == "on" and r["grad_checkpointing_on"] is True and "error" not in r
    assert r["steps"] == 1 and r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0 and r["n_val"] == 1
    assert abs(sum(r["share"].values()) - 1) < 1e-6
    assert result["model"] == "sam-micro" and result["threads"] == 1 and result["machine"]
    assert "| on |" in capsys.readouterr().out
    assert not any(Path(tmp_path).glob("wesam-adapt-vitb-*"))  # the generated checkpoint is gone
