"""sam-mini pretraining: prompts as users give them, the in-box objectness loss, stuff filtering,
warm start, resumable runs and the in-box logit health metric (sam-micro, synthetic scenes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wesam.data.instances import instances_from_mask
from wesam.pretrain.prompting import BoxPromptRecipe, box_regions, inbox_balanced_bce, initial_prompts
from wesam.pretrain.trainer import PretrainConfig, Pretrainer, _config_json, reproduce_command
from wesam.sam.transforms import SamTransform
from wesam.sam.zoo import SAM_MICRO, build_sam, save_safetensors


def test_box_regions_cover_inclusive_boxes_at_loss_resolution() -> None:
    boxes = torch.tensor([[2.0, 4.0, 5.0, 6.0]])  # inclusive pixel box in a 16-px frame
    full = box_regions(boxes, 16, 1.0)[0]
    assert full.sum() == 4 * 3 and full[4:7, 2:6].all()
    half = box_regions(boxes, 8, 2.0)[0]  # pixel centres 1, 3, 5, ... of the 16-px frame
    assert half[2, 1:3].all() and half.sum() == 2  # x centres 3, 5 and y centre 5 lie in the box


def test_inbox_loss_rewards_the_object_not_the_box() -> None:
    gts = torch.zeros(1, 16, 16)
    gts[0, 6:10, 6:10] = 1.0  # object fills a quarter of its box
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 4:12, 4:12] = True
    right = torch.where(gts > 0, 6.0, -6.0)
    fill_box = torch.where(region, 6.0, -6.0)
    unsure = torch.zeros(1, 16, 16)
    loss = lambda logits: float(inbox_balanced_bce(logits, gts, region))
    assert loss(right) < 0.01
    assert loss(fill_box) > 2.5 > loss(unsure) > 0.6  # filling the box is worse than not deciding
    # Balanced: an object filling most of its box weighs its background as much as a small one does.
    big = torch.zeros(1, 16, 16)
    big[0, 4:12, 4:11] = 1.0
    assert float(inbox_balanced_bce(torch.where(region, 6.0, -6.0), big, region)) == pytest.approx(
        0.5 * float(torch.nn.functional.softplus(torch.tensor(6.0))), rel=1e-3)


def test_tight_and_jittered_boxes() -> None:
    gts = np.zeros((20, 64, 64), bool)
    for i in range(20):
        gts[i, 10 + i:30 + i, 5:40] = True
    transform = SamTransform(64, 16)
    tight = initial_prompts(gts, "box", np.random.default_rng(0), transform, torch.device("cpu"),
                            BoxPromptRecipe(tight_frac=1.0))
    exact = np.stack([[5, 10 + i, 39, 29 + i] for i in range(20)]).astype(np.float32)
    np.testing.assert_array_equal(tight.boxes.numpy(), exact)
    noisy = initial_prompts(gts, "box", np.random.default_rng(0), transform, torch.device("cpu"),
                            BoxPromptRecipe(tight_frac=0.0, std_frac=0.5, max_px=3.0)).boxes.numpy()
    delta = np.abs(noisy - exact)
    assert delta.max() <= 3.0 + 1e-6 and (delta > 0).mean() > 0.8
    mixed = initial_prompts(gts, "box", np.random.default_rng(1), transform, torch.device("cpu"),
                            BoxPromptRecipe(tight_frac=0.5, std_frac=0.5, max_px=3.0)).boxes.numpy()
    n_exact = int((np.abs(mixed - exact).max(1) == 0).sum())
    assert 3 <= n_exact <= 17


def test_stuff_classes_are_dropped_from_semantic_masks() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[:10] = 1  # sky
    mask[20:25, 5:10] = 9  # car
    mask[20:25, 20:25] = 9  # another car
    assert len(instances_from_mask(mask, "semantic")) == 3
    things = instances_from_mask(mask, "semantic", ignore_classes=(1,))
    assert len(things) == 2 and not things[:, :10].any()


def _cfg(tmp_path: Path, **kw) -> PretrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), data_root=None, steps=2, time_budget_min=None, batch_size=2,
                max_prompts=2, warmup_steps=1, n_synth_val=3, threads=1, model_config=SAM_MICRO,
                eval_every_min=1e9, ckpt_every_min=1e9)
    base.update(kw)
    return PretrainConfig(**base)


def test_training_steps_resume_and_health(tmp_path: Path) -> None:
    logs: list[str] = []
    summary = Pretrainer(_cfg(tmp_path, inbox_weight=1.0), log=logs.append).run()
    assert summary["steps"] == 2
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert {"synthetic_box", "synthetic_click", "inbox_object_logit", "inbox_background_logit"} <= set(best)
    # A longer budget resumes from the checkpoint instead of starting over.
    resumed = Pretrainer(_cfg(tmp_path, steps=3, inbox_weight=1.0), log=logs.append)
    assert resumed.resume() and resumed.step == 2
    assert resumed.run()["steps"] == 3
    # The learning curve is readable from the run directory for the benchmark report.
    import contextlib
    import io

    from wesam.bench import pretrain_curve

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pretrain_curve.main([f"micro={tmp_path / 'run'}", "--shipped", "", "--no-results"]) == 0
    table = out.getvalue()
    assert "### micro" in table and "in-box object logit" in table and table.count("\n| ") >= 3


def test_warm_start_loads_the_weights_and_records_a_first_point(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = build_sam(SAM_MICRO)
    weights = tmp_path / "micro.safetensors"
    save_safetensors(source, weights, name="sam-micro", config=SAM_MICRO)
    t = Pretrainer(_cfg(tmp_path, steps=1, init_from=str(weights)), log=lambda *_: None)
    for (k, a), b in zip(source.state_dict().items(), t.sam.state_dict().values()):
        assert torch.equal(a, b), k
    t.run()
    assert t.history[0]["step"] == 0  # the starting point is on the learning curve


def test_warm_start_refuses_another_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shares no image encoder"):
        Pretrainer(_cfg(tmp_path, init_from="sam-mini"), log=lambda *_: None)


def test_reproduce_command_names_the_recipe() -> None:
    cfg = _config_json(PretrainConfig(out_dir="runs/x", time_budget_min=30, threads=2, inbox_weight=0.5,
                                      init_from="sam-mini", things_only=False))
    cmd = reproduce_command(cfg)
    assert cmd.startswith("wesam pretrain --data-root ../shared/data --out runs/x")
    for part in ("--time-budget 30", "--threads 2", "--inbox-weight 0.5", "--init-from sam-mini", "--with-stuff"):
        assert part in cmd
    assert "--lr" not in cmd  # defaults are left out


def test_narrow_decoder_warm_starts_the_encoder_trunk(tmp_path: Path) -> None:
    from dataclasses import replace

    wide = build_sam(SAM_MICRO)
    weights = tmp_path / "micro.safetensors"
    save_safetensors(wide, weights, name="sam-micro", config=SAM_MICRO)
    narrow_cfg = replace(SAM_MICRO, prompt_embed_dim=16, decoder_mlp_dim=32, iou_head_hidden_dim=16)
    t = Pretrainer(_cfg(tmp_path, model_config=narrow_cfg, init_from=str(weights)), log=lambda *_: None)
    own, src = t.sam.state_dict(), wide.state_dict()
    assert torch.equal(own["image_encoder.blocks.0.attn.qkv.weight"], src["image_encoder.blocks.0.attn.qkv.weight"])
    assert own["mask_decoder.iou_token.weight"].shape[1] == 16
    assert t.run()["steps"] == 2


def test_sam_mini_decoder_width() -> None:
    from wesam.pretrain.trainer import sam_mini_config
    from wesam.sam.zoo import SAM_MINI

    assert sam_mini_config(256) is SAM_MINI
    c = sam_mini_config(128)
    assert (c.prompt_embed_dim, c.decoder_mlp_dim, c.iou_head_hidden_dim, c.encoder_embed_dim) == (128, 1024, 128, 192)
    with pytest.raises(ValueError):
        sam_mini_config(100)
    cmd = reproduce_command(_config_json(PretrainConfig(model_config=c)))
    assert "--decoder-dim 128" in cmd


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_without_cuda_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        Pretrainer(_cfg(tmp_path, device="cuda"), log=lambda *_: None)
    with pytest.raises(ValueError, match="--device"):
        Pretrainer(_cfg(tmp_path, device="toaster"), log=lambda *_: None)
    cmd = reproduce_command(_config_json(PretrainConfig(out_dir="runs/x", device="cuda")))
    assert "--device cuda" in cmd and "--device" not in reproduce_command(_config_json(PretrainConfig()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_training_on_cuda_resumes_and_validates(tmp_path: Path) -> None:
    t = Pretrainer(_cfg(tmp_path, device="cuda"), log=lambda *_: None)
    assert t.run()["steps"] == 2 and next(t.sam.parameters()).is_cuda
    resumed = Pretrainer(_cfg(tmp_path, steps=3, device="cuda"), log=lambda *_: None)
    assert resumed.resume() and resumed.run()["steps"] == 3
