"""WeSAM adaptation: losses against hand-computed values, gradient paths, determinism, resume,
and the publish guarantees of `wesam adapt` (nothing visible after a crash, kill or Ctrl-C)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from adapt_support import make_adapt_setup

from wesam.adapters.adapt import constraints as C
from wesam.adapters.adapt import losses as L
from wesam.adapters.adapt.trainer import ADAPTER, AdaptationTrainer, AdaptConfig
from wesam.adapters.adapt.views import flip_view, strong_photometric
from wesam.adapters.lora import adapter_state
from wesam.adapters.registry import Registry
from wesam.data.weak import derive_weak_labels, inscribed_ellipse_masks
from wesam.sam.transforms import SamTransform

ROOT = Path(__file__).resolve().parent.parent


# -- losses ------------------------------------------------------------------------------------------

def test_focal_hand_computed() -> None:
    logits = torch.zeros(1, 2, 2)
    target = torch.ones(1, 2, 2)
    # p = 0.5: BCE = ln 2, (1 - p_t)^2 = 1/4, alpha = 0.8
    assert L.constant_alpha_focal(logits, target, alpha=0.8).item() == pytest.approx(0.8 * 0.25 * math.log(2), rel=1e-5)


def test_dice_hand_computed() -> None:
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    half = torch.zeros(1, 2, 2)  # p = 0.5 everywhere: 1 - (2*1 + 1) / (2 + 2 + 1)
    assert L.dice_loss(half, target, smooth=1.0, per_mask=False).item() == pytest.approx(0.4, rel=1e-6)
    sure = torch.tensor([[[30.0, 30.0], [-30.0, -30.0]]])
    assert L.dice_loss(sure, target, smooth=1.0, per_mask=False).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_head_target_uses_student_mask() -> None:
    student = torch.tensor([[[5.0, 5.0], [5.0, -5.0]]])  # 3 pixels on
    pseudo = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # 2 on, both covered: IoU = 2/3
    terms = L.self_training_loss(student, pseudo, torch.tensor([0.0]))
    assert terms["iou"].item() == pytest.approx((2 / 3) ** 2, rel=1e-5)


def _single_object_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb_t = torch.randn(8, 4, 4, generator=g, requires_grad=True)
    emb_a = torch.randn(8, 4, 4, generator=g)
    lr = torch.full((1, 1, 16, 16), -5.0)
    lr[..., 4:12, 4:12] = 5.0
    return emb_t, emb_a, lr


def test_contrastive_is_nonzero_on_single_object_with_background() -> None:
    emb_t, emb_a, lr = _single_object_inputs()
    with_bg = L.contrastive_loss(emb_t, emb_a, lr, lr, background=True)
    without = L.contrastive_loss(emb_t, emb_a, lr, lr, background=False)
    assert with_bg.item() > 1e-3
    assert without.item() == pytest.approx(0.0, abs=1e-7)  # the reference's N = 1 failure mode
    (grad,) = torch.autograd.grad(with_bg, emb_t)
    assert grad.abs().sum() > 0


def test_contrastive_hand_computed_two_instances() -> None:
    # Orthogonal pooled vectors, identical for teacher and anchor: s = I / tau.
    emb = torch.zeros(2, 2, 2)
    emb[0, 0, :] = 1.0
    emb[1, 1, :] = 1.0
    lr = torch.full((2, 1, 8, 8), -5.0)
    lr[0, 0, :4, :] = 5.0
    lr[1, 0, 4:, :] = 5.0
    got = L.contrastive_loss(emb, emb, lr, lr, tau=0.3, background=False)
    want = -math.log(math.exp(1 / 0.3) / (math.exp(1 / 0.3) + 1.0))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_box_projection_point_and_coarse_terms() -> None:
    logits = torch.full((1, 10, 10), -20.0)
    logits[0, 2:6, 3:8] = 20.0
    box = torch.tensor([[3.0, 2.0, 7.0, 5.0]])
    assert L.box_projection_loss(logits, box).item() == pytest.approx(0.0, abs=1e-4)
    assert L.box_projection_loss(logits, torch.tensor([[0.0, 0.0, 9.0, 9.0]])).item() > 0.2
    coords = torch.tensor([[[4.0, 3.0], [9.0, 9.0]]])
    labels = torch.tensor([[1, 0]])
    assert L.point_loss(logits, coords, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert L.point_loss(logits, coords, torch.tensor([[0, 1]])).item() > 10
    coarse = torch.zeros(1, 10, 10)
    coarse[0, 2:6, 3:8] = 1
    assert L.coarse_agreement_loss(logits, coarse, band_px=1).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.zeros(1, 10, 10)
    assert L.coarse_agreement_loss(logits, wrong, band_px=1).item() > 1


def test_colour_affinity_and_pairwise_hand_computed() -> None:
    lab = torch.zeros(3, 6, 6)
    lab[0, :, 3:] = 4.0  # a colour edge between columns 2 and 3, |dL| = 4
    aff = L.colour_affinity(lab, dilation=1, theta=2.0)
    offsets = L._neighbour_offsets(1)
    right = offsets.index((0, 1))
    assert aff[right, 0, 2].item() == pytest.approx(math.exp(-2.0))  # across the edge
    assert aff[right, 0, 0].item() == pytest.approx(1.0)
    box = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    split = torch.full((1, 6, 6), 30.0)
    split[0, :, 3:] = -30.0
    # Splitting along the colour edge costs nothing: those edges (similarity e^-2 < tau) are dropped.
    assert L.pairwise_affinity_loss(split, aff, box, dilation=1).item() == pytest.approx(0.0, abs=1e-6)
    # On a uniform image every edge is kept; a cut edge costs -log P(same) = -log(2 e^-30) = 30 - ln 2.
    flat = L.colour_affinity(torch.zeros(3, 6, 6), dilation=1)
    loss = L.pairwise_affinity_loss(split, flat, box, dilation=1).item()
    # 6x6 grid, 8-neighbourhood: 2*(5*6*2) + 2*(5*5*2) = 220 directed edges, 6+5+5 = 16 undirected
    # cross the cut (one straight, two diagonal per row boundary), 32 directed.
    assert loss == pytest.approx(32 * (30.0 - math.log(2)) / 220, rel=1e-4)
    # Only edges with both ends inside the box count.
    tiny = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert L.pairwise_affinity_loss(split, flat, tiny, dilation=1).item() == pytest.approx(0.0, abs=1e-6)


# -- views -------------------------------------------------------------------------------------------

def test_flip_view_moves_prompts_with_pixels() -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 2:6, 3:10] = True
    label = derive_weak_labels(masks, "box")
    for h, v in ((True, False), (False, True), (True, True)):
        _, m2, l2 = flip_view(img, masks, label, h, v)
        again = derive_weak_labels(m2, "box")
        np.testing.assert_allclose(l2.boxes, again.boxes)
    pts = derive_weak_labels(masks, "point", seed=1, key="a", n_points=(3, 0))
    _, m2, l2 = flip_view(img, masks, pts, True, True)
    xs, ys = l2.point_coords[0, :, 0].astype(int), l2.point_coords[0, :, 1].astype(int)
    assert m2[0, ys, xs].all()


def test_strong_view_keeps_geometry() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
    out = strong_photometric(img, rng)
    assert out.shape == img.shape and out.dtype == np.uint8


# -- trainer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_adapt_setup(tmp_path_factory.mktemp("adapt"), n_images=10, n_train=8)


def _cfg(setup, **kw) -> AdaptConfig:
    tmp, root, model_path = setup
    base = dict(data=str(root), domain="polyp", model=str(model_path), registry=str(tmp / "reg"), steps=3,
                batch_size=2, eval_every=2, work_dir=str(tmp / f"w-{time.monotonic_ns()}"))
    base.update(kw)
    return AdaptConfig(**base)


def test_teacher_gradient_paths(setup) -> None:
    """§2: pseudo-label terms give the teacher no gradient; anchor and contrast terms do."""
    a = AdaptationTrainer(_cfg(setup, method="wesam"), log=lambda *_: None)
    rng = np.random.default_rng(0)
    weak, strong = a._view(a.train[0], rng)
    e_a = a.anchor.image_encoder(weak.image[None]).detach()
    e_t = a.sam.image_encoder(weak.image[None])
    e_s = a.sam.image_encoder(strong.image[None])
    losses = a._image_losses(weak, strong, e_a, e_t, e_s)
    for key in ("focal", "dice", "iou"):
        (g,) = torch.autograd.grad(losses[key], e_t, retain_graph=True, allow_unused=True)
        assert g is None or g.abs().sum() == 0, key
    for key in ("anchor", "contrast"):
        (g,) = torch.autograd.grad(losses[key], e_t, retain_graph=True, allow_unused=True)
        assert g is not None and g.abs().sum() > 0, key
    assert all(not p.requires_grad for p in a.anchor.parameters())


@pytest.mark.parametrize("method,prompt", [("self-training", "box"), ("anchor", "point"), ("wesam", "coarse"),
                                           ("wesam+", "box"), ("wesam+", "point"), ("oracle", "box")])
def test_every_method_trains_lora_only(setup, method, prompt) -> None:
    a = AdaptationTrainer(_cfg(setup, method=method, prompt=prompt), log=lambda *_: None)
    before = {k: v.clone() for k, v in a.sam.state_dict().items()}
    terms = a.train_step()
    assert math.isfinite(terms["loss"])
    after = a.sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)


def test_pairwise_term_is_used_with_boxes(setup) -> None:
    a = AdaptationTrainer(_cfg(setup, method="wesam+", prompt="box", pairwise=True), log=lambda *_: None)
    terms = a.train_step()
    assert terms["pairwise"] > 0 and math.isfinite(terms["loss"])


def test_deterministic_and_resume_equivalent(setup) -> None:
    def state(adapter):
        return {k: v.clone() for k, v in adapter_state(adapter.sam, ADAPTER).items()}

    straight = AdaptationTrainer(_cfg(setup, steps=4, method="wesam+"), log=lambda *_: None)
    straight.run(publish=False)
    again = AdaptationTrainer(_cfg(setup, steps=4, method="wesam+"), log=lambda *_: None)
    again.run(publish=False)
    ck = torch.load(straight.ckpt_path, weights_only=True)["adapter"]
    ck2 = torch.load(again.ckpt_path, weights_only=True)["adapter"]
    assert all(torch.equal(ck[k], ck2[k]) for k in ck)

    work = str(setup[0] / "resume-work")
    first = AdaptationTrainer(_cfg(setup, steps=2, method="wesam+", work_dir=work), log=lambda *_: None)
    first.run(publish=False)
    resumed = AdaptationTrainer(_cfg(setup, steps=4, method="wesam+", work_dir=work), log=lambda *_: None)
    assert resumed.resume() and resumed.step == 2
    resumed.run(resume=False, publish=False)
    ck3 = torch.load(resumed.ckpt_path, weights_only=True)["adapter"]
    for k in ck:
        torch.testing.assert_close(ck3[k], ck[k], atol=1e-6, rtol=1e-5)

    other = AdaptationTrainer(_cfg(setup, steps=4, method="wesam+", seed=1), log=lambda *_: None)
    other.run(publish=False)
    ck4 = torch.load(other.ckpt_path, weights_only=True)["adapter"]
    assert any(not torch.equal(ck[k], ck4[k]) for k in ck)


def _wesam_adapt(setup, *extra: str, steps: int = 3) -> subprocess.Popen:
    tmp, root, model_path = setup
    return subprocess.Popen(
        [sys.executable, "-m", "wesam.cli", "adapt", "--model", str(model_path), "--data", str(root),
         "--domain", "polyp", "--registry", str(tmp / "cli-reg"), "--steps", str(steps), "--batch-size", "2",
         "--eval-every", "1", "--work-dir", str(tmp / f"cli-w-{time.monotonic_ns()}"), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_publishes_a_verified_version(setup) -> None:
    p = _wesam_adapt(setup, "--method", "wesam", "--json", str(setup[0] / "summary.json"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    summary = json.loads((setup[0] / "summary.json").read_text())
    assert summary["adapter"] == "polyp@v1" and summary["steps"] == 3
    art = Registry(setup[0] / "cli-reg").resolve("polyp")
    meta = art.meta
    assert meta["method"] == "wesam" and meta["prompt"] == "box" and meta["steps"] == 3
    assert meta["supervision"]["kind"] == "weak" and "boxes" in meta["supervision"]["labels"]
    assert meta["base_model"]["sha256"] and meta["data"]["fingerprint"]
    assert set(meta["metrics"]) >= {"before", "after"}


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_interrupted_run_publishes_nothing(setup, sig, code) -> None:
    reg = Registry(setup[0] / "cli-reg-int")
    tmp, root, model_path = setup
    work = tmp / f"int-{sig}"
    p = subprocess.Popen(
        [sys.executable, "-m", "wesam.cli", "adapt", "--model", str(model_path), "--data", str(root),
         "--domain", "polyp", "--registry", str(reg.root), "--steps", "100000", "--batch-size", "2",
         "--eval-every", "1", "--work-dir", str(work)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A test runner started in the background (`nohup ... &`) passes SIGINT on as ignored, and
        # Python then never raises KeyboardInterrupt: give the child the default disposition, as a
        # terminal would, so Ctrl-C is what is tested.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (work / "checkpoint.pt").exists():  # training is under way
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code
    if sig == signal.SIGINT:
        assert "nothing published" in err
    assert reg.versions("polyp") == []


def test_torchrun_two_process_gloo_matches_single_process(setup) -> None:
    """Data-parallel adaptation (2 CPU processes, gloo) equals the single-process run."""
    tmp, root, model_path = setup
    common = ["adapt", "--model", str(model_path), "--data", str(root), "--domain", "polyp", "--steps", "2",
              "--batch-size", "4", "--eval-every", "1", "--method", "wesam+", "--threads", "1"]
    single, double = tmp / "ddp-1", tmp / "ddp-2"
    r = subprocess.run([sys.executable, "-m", "wesam.cli", *common, "--registry", str(tmp / "ddp-reg-1"),
                        "--work-dir", str(single)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29561", "-m", "wesam.cli", *common, "--registry", str(tmp / "ddp-reg-2"),
                        "--work-dir", str(double)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(single / "checkpoint.pt", weights_only=True)["adapter"]
    b = torch.load(double / "checkpoint.pt", weights_only=True)["adapter"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert Registry(tmp / "ddp-reg-2").versions("polyp") == [1]  # rank 0 published once


def test_drift_report_reads_a_finished_run(setup, capsys) -> None:
    from wesam.bench.adaptation_drift import main as drift_main

    cfg = _cfg(setup, method="self-training", steps=2, eval_every=1)
    AdaptationTrainer(cfg, log=lambda *_: None).run(publish=False)
    assert drift_main(["--work-dir", cfg.work_dir, "--data", cfg.data, "--method", "self-training",
                       "--model", cfg.model]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"no adapter", "best", "last"}
    for stats in report.values():
        assert 0.0 <= stats["instance_miou"] <= 1.0 and stats["median_area_ratio"] >= 0.0


# -- adaptation v2: weak-label constraints, confidence quantile, anchor kinds, selection, speed ------


def test_input_frame_boxes_cover_the_resized_box_exactly() -> None:
    t = SamTransform(1024, 256)
    for size in ((48, 64), (1500, 2000)):  # up- and down-scaling
        h, w = size
        box = np.array([[10, 5, 20, 15]], np.float32)  # inclusive pixels
        mask = np.zeros((1, h, w), np.float32)
        mask[0, 5:16, 10:21] = 1
        _, (ih, iw) = t.image_to_tensor(np.zeros((h, w, 3), np.uint8))
        resized = torch.nn.functional.interpolate(torch.as_tensor(mask)[:, None], (ih, iw), mode="nearest")[:, 0] > 0
        region = C.box_region(torch.as_tensor(C.input_frame_boxes(box, size, t)), (ih, iw), margin=0)
        assert not (resized & ~region).any()  # every resized box pixel is inside
        ys, xs = np.nonzero(region[0].numpy())
        rys, rxs = np.nonzero(resized[0].numpy())
        assert abs(ys.min() - rys.min()) <= 1 and abs(ys.max() - rys.max()) <= 1
        assert abs(xs.min() - rxs.min()) <= 1 and abs(xs.max() - rxs.max()) <= 1
    dilated = C.box_region(torch.tensor([[3.0, 4.0, 5.0, 6.0]]), (12, 12), margin=2)
    assert dilated[0].sum() == (3 + 4) * (3 + 4) and dilated[0, 2, 1] and not dilated[0, 1, 1]


def test_paint_points_and_quantile_weight() -> None:
    x = torch.full((2, 9, 9), 0.5)
    coords = torch.tensor([[[4.0, 4.0], [0.0, 0.0]], [[8.0, 8.0], [1.0, 7.0]]])
    labels = torch.tensor([[1, 0], [0, -1]])
    out = C.paint_points(x, coords, labels, radius=1)
    assert out[0, 4, 4] == 1 and out[0, 3, 4] == 1 and out[0, 3, 3] == 0.5  # a disk, not a square
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 0 and out[1, 8, 8] == 0
    assert out[1, 7, 1] == 0.5  # label -1 is ignored
    assert ((out != x).sum() == 5 + 3 + 3) and torch.equal(x, torch.full((2, 9, 9), 0.5))

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 50, generator=g)
    region = C.box_region(torch.tensor([[5.0, 5.0, 30.0, 20.0], [0.0, 0.0, 49.0, 39.0], [10.0, 10.0, 12.0, 12.0]]),
                          (40, 50))
    for q in (0.1, 0.5, 0.9):
        w = C.quantile_weight(logits, q, region)
        ignored = (w == 0)
        assert not (ignored & ~region).any()  # outside the box nothing is ignored
        assert ignored.sum().item() / region.sum().item() == pytest.approx(q, abs=2e-3)
        # the ignored ones are the least confident of the box
        assert logits.abs()[ignored].max() <= logits.abs()[region & ~ignored].min()
    assert torch.equal(C.quantile_weight(logits, 0.0, region), torch.ones_like(logits))
    assert (C.quantile_weight(logits, 0.25) == 0).float().mean().item() == pytest.approx(0.25, abs=1e-3)


def test_anchor_hold_losses() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = 3 * torch.randn(2, 8, 8, generator=g)
    for kind in ("logit", "prob"):
        same = anchor.clone().requires_grad_(True)
        assert L.anchor_hold_loss(same, anchor, kind).item() == pytest.approx(0.0, abs=1e-12)
        other = torch.randn(2, 8, 8, generator=g, requires_grad=True)
        loss = L.anchor_hold_loss(other, anchor, kind)
        assert math.isfinite(loss.item()) and loss.item() > 0
        (grad,) = torch.autograd.grad(loss, other)
        assert grad.abs().sum() > 0
    # logit: agreement beyond the clip costs nothing; disagreement beyond it still pulls back
    pred = torch.tensor([[[10.0, 10.0]]], requires_grad=True)
    assert L.anchor_hold_loss(pred, torch.tensor([[[6.0, 50.0]]]), "logit", clip=4.0).item() == 0.0
    loss = L.anchor_hold_loss(pred, torch.tensor([[[-6.0, -6.0]]]), "logit", clip=4.0)
    assert loss.item() == pytest.approx(8 - 0.5)  # smooth-L1 of |4 - (-4)| = 8
    (grad,) = torch.autograd.grad(loss, pred)
    assert (grad > 0).all()
    with pytest.raises(ValueError):
        L.anchor_hold_loss(pred, anchor, "dice")


def _capture(monkeypatch, name: str) -> list:
    seen = []
    orig = getattr(L, name)

    def wrapped(*args, **kw):
        seen.append(args)
        return orig(*args, **kw)

    monkeypatch.setattr(L, name, wrapped)
    return seen


def _losses_once(a: AdaptationTrainer, seed: int = 0):
    weak, strong = a._view(a.train[0], np.random.default_rng(seed))
    with torch.no_grad():
        e_a = a.anchor.image_encoder(weak.image[None])
        e_t = a.sam.image_encoder(weak.image[None])
        e_s = a.sam.image_encoder(strong.image[None])
        return weak, strong, a._image_losses(weak, strong, e_a, e_t, e_s)


def test_clip_to_box_constrains_pseudo_and_anchor_labels(setup, monkeypatch) -> None:
    st = _capture(monkeypatch, "self_training_loss")
    an = _capture(monkeypatch, "anchor_loss")
    plain = AdaptationTrainer(_cfg(setup, method="anchor"), log=lambda *_: None)
    _losses_once(plain)
    clip = AdaptationTrainer(_cfg(setup, method="anchor", clip_to_box=True, clip_margin=2), log=lambda *_: None)
    weak, _, losses = _losses_once(clip)
    assert all(math.isfinite(v.item()) for v in losses.values())
    region = C.box_region(weak.box_pixels, weak.input_size, 2)
    assert not ((weak.gt > 0.5) & ~region).any()  # exact: the object never leaves its dilated box
    assert (~region).any()
    for before, after in ((st[0][1], st[1][1]), (an[0][2], an[1][2])):  # pseudo-labels, anchor labels
        assert (after[~region] == 0).all()
        assert torch.equal(after[region], before[region])
    # the untrained model predicts foreground outside the box somewhere, so the clip did something
    assert (st[0][1][~region] > 0).any() or (an[0][2][~region] > 0).any()


def test_ellipse_prior_draws_the_ellipse_floor() -> None:
    boxes = np.array([[3, 4, 20, 9], [0, 0, 30, 30], [10, 10, 10, 12]], np.float64)
    prior = C.ellipse_prior(torch.as_tensor(boxes), (32, 40))
    assert prior.shape == (3, 32, 40)
    assert np.array_equal((prior >= 0).numpy(), inscribed_ellipse_masks(boxes, (32, 40)))
    assert prior[1, 15, 15].item() == pytest.approx(1.0)  # the centre of box 1
    assert prior.max() <= 1.0


def test_box_prior_shifts_pseudo_and_anchor_labels_towards_the_ellipse(setup, monkeypatch) -> None:
    st = _capture(monkeypatch, "self_training_loss")
    an = _capture(monkeypatch, "anchor_loss")
    plain = AdaptationTrainer(_cfg(setup, method="anchor", clip_to_box=True), log=lambda *_: None)
    weak, _, _ = _losses_once(plain)
    ellipse = C.ellipse_prior(weak.box_pixels, weak.input_size) >= 0
    region = C.box_region(weak.box_pixels, weak.input_size, plain.cfg.clip_margin)
    # a weight beyond any logit: the labels are the ellipse (up to its rim, where 1 - r^2 is ~0)
    strong = AdaptationTrainer(_cfg(setup, method="anchor", clip_to_box=True, box_prior=1000.0), log=lambda *_: None)
    _losses_once(strong)
    for labels in (st[1][1], an[1][2]):  # pseudo-labels, anchor labels
        assert (labels.bool() == (ellipse & region)).float().mean() > 0.99
    # a mild prior changes fewer labels than a dominant one (it moves only the pixels where the model is unsure)
    mild = AdaptationTrainer(_cfg(setup, method="anchor", clip_to_box=True, box_prior=0.05), log=lambda *_: None)
    _losses_once(mild)
    changed = st[2][1] != st[0][1]
    assert changed.float().mean() < (st[1][1] != st[0][1]).float().mean()
    assert plain.cfg.run_name != strong.cfg.run_name and "-prior1000" in strong.cfg.run_name
    terms = strong.train_step()
    assert math.isfinite(terms["loss"])
    with pytest.raises(ValueError, match="box prompts"):
        _cfg(setup, prompt="point", box_prior=2.0)
    with pytest.raises(ValueError, match="finite"):
        _cfg(setup, box_prior=0.0)


def _points_ellipse_reference(coords: np.ndarray, labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Mahalanobis distance <= 2 under the positive points' covariance (+1 px²), written independently."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    out = np.zeros((len(coords), *hw), bool)
    for i, (c, lab) in enumerate(zip(coords, labels)):
        pos = c[lab == 1]
        if len(pos):
            cov = (np.cov(pos.T) if len(pos) > 1 else np.zeros((2, 2))) + np.eye(2)
            d = np.stack([xx - pos.mean(0)[0], yy - pos.mean(0)[1]], -1)
            out[i] = np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(cov), d) <= 4.0
    return out


def test_points_prior_is_the_two_sigma_ellipse_of_the_positive_points() -> None:
    rng = np.random.default_rng(0)
    coords = rng.uniform(4, 28, (3, 10, 2))
    labels = np.tile(np.array([1] * 5 + [0] * 5), (3, 1))
    labels[2] = [1] + [0] * 9  # a single positive point: a disk of radius 2 px (covariance = 1 px²)
    prior = C.points_prior(torch.as_tensor(coords), torch.as_tensor(labels), (32, 40))
    assert prior.shape == (3, 32, 40) and prior.max() <= 1.0
    assert np.array_equal((prior >= 0).numpy(), _points_ellipse_reference(coords, labels, (32, 40)))
    assert prior[2].max().item() == pytest.approx(1.0, abs=0.2)  # near 1 at the single point
    none = C.points_prior(torch.as_tensor(coords[:1]), torch.zeros((1, 10)), (32, 40))
    assert torch.equal(none, torch.zeros_like(none))  # no positive point: no prior


def test_point_prior_shifts_pseudo_labels_towards_the_points_ellipse(setup, monkeypatch) -> None:
    st = _capture(monkeypatch, "self_training_loss")
    plain = AdaptationTrainer(_cfg(setup, method="anchor", prompt="point"), log=lambda *_: None)
    weak, _, _ = _losses_once(plain)
    ellipse = C.points_prior(weak.coords_input, weak.point_labels, weak.input_size) >= 0
    strong = AdaptationTrainer(_cfg(setup, method="anchor", prompt="point", point_prior=1000.0), log=lambda *_: None)
    _losses_once(strong)
    assert (st[1][1].bool() == ellipse).float().mean() > 0.99
    assert (st[0][1].bool() != ellipse).float().mean() > 0.01  # without the prior the labels were not the ellipse
    assert "-pprior1000" in strong.cfg.run_name and math.isfinite(strong.train_step()["loss"])
    with pytest.raises(ValueError, match="point prompts"):
        _cfg(setup, prompt="box", point_prior=2.0)
    with pytest.raises(ValueError, match="finite"):
        _cfg(setup, prompt="point", point_prior=float("inf"))


def test_respect_points_fixes_labelled_disks(setup, monkeypatch) -> None:
    st = _capture(monkeypatch, "self_training_loss")
    a = AdaptationTrainer(_cfg(setup, method="self-training", prompt="point", respect_points=True, point_radius=1),
                          log=lambda *_: None)
    weak, _, _ = _losses_once(a)
    pseudo = st[0][1]
    x = weak.coords_input[..., 0].round().long()
    y = weak.coords_input[..., 1].round().long()
    n = torch.arange(len(x))[:, None].expand_as(x)
    lab = weak.point_labels
    painted = pseudo[n, y, x]
    pos = lab == 1
    assert pos.any() and (painted[pos] == 1).all()
    # a negative disk may be overpainted only by an overlapping positive disk of the same instance
    assert (painted[lab == 0] == 0).float().mean() > 0.5


def test_confidence_quantile_ignores_q_of_the_box(setup, monkeypatch) -> None:
    st = _capture(monkeypatch, "self_training_loss")
    a = AdaptationTrainer(_cfg(setup, method="wesam+", confidence_quantile=0.3), log=lambda *_: None)
    weak, _, losses = _losses_once(a)
    weight = st[0][3]
    region = C.box_region(weak.box_pixels, weak.input_size, a.cfg.clip_margin)
    ignored = weight == 0
    assert not (ignored & ~region).any()
    assert ignored.sum().item() / region.sum().item() == pytest.approx(0.3, abs=0.01)
    assert math.isfinite(losses["focal"].item())
    terms = a.train_step()
    assert math.isfinite(terms["loss"])


@pytest.mark.parametrize("kind", ["dice", "logit", "prob"])
def test_anchor_kinds_train_and_vanish_when_student_is_anchor(setup, kind) -> None:
    a = AdaptationTrainer(_cfg(setup, method="anchor", anchor_kind=kind), log=lambda *_: None)
    weak, _ = a._view(a.train[0], np.random.default_rng(0))
    with torch.no_grad():  # LoRA B = 0: the LoRA model equals the anchor; the weak view for all three
        e = a.anchor.image_encoder(weak.image[None])
        losses = a._image_losses(weak, weak, e, e, e)
    assert math.isfinite(losses["anchor"].item())
    if kind != "dice":  # dice against hard masks is not 0 for a soft prediction
        assert losses["anchor"].item() == pytest.approx(0.0, abs=1e-6)
    terms = a.train_step()
    assert math.isfinite(terms["loss"]) and math.isfinite(terms["anchor"]) and terms["anchor"] >= 0


def test_fixed_selection_publishes_the_last_step_and_reports_speed(setup) -> None:
    a = AdaptationTrainer(_cfg(setup, steps=3, eval_every=1, select="fixed"), log=lambda *_: None)
    summary = a.run(publish=True)
    assert summary["select"] == "fixed" and summary["selected_step"] == 3
    assert len(a.history) == 3  # validation still logged every step
    last = torch.load(a.ckpt_path, weights_only=True)["adapter"]
    published = Registry(a.cfg.registry).resolve(summary["adapter"])
    assert published.meta["selection"] == {"rule": "fixed", "step": 3}
    now = adapter_state(a.sam, ADAPTER)
    assert all(torch.equal(now[k], last[k]) for k in last)
    assert any(v.abs().sum() > 0 for k, v in last.items() if k.endswith("lora_B"))

    speed = summary["speed"]
    assert speed["steps"] == 3 and speed["steps_per_s"] > 0 and speed["train_seconds"] > 0
    assert speed["validation_seconds"] > 0
    share = speed["share"]
    assert set(share) == {"encoder_forward", "encoder_backward", "decoder_forward", "decoder_backward", "rest"}
    assert all(v >= 0 for v in share.values()) and sum(share.values()) <= 1 + 1e-9
    assert share["encoder_forward"] > 0 and share["decoder_forward"] > 0 and share["encoder_backward"] > 0

    best = AdaptationTrainer(_cfg(setup, steps=3, eval_every=1), log=lambda *_: None)
    s = best.run(publish=False)
    assert s["select"] == "best" and s["selected_step"] in [0] + [r["step"] for r in best.history if r.get("best")]


def test_resume_accepts_checkpoints_from_before_the_new_options(setup) -> None:
    work = str(setup[0] / "old-ckpt-work")
    first = AdaptationTrainer(_cfg(setup, steps=2, method="self-training", work_dir=work), log=lambda *_: None)
    first.run(publish=False)
    state = torch.load(first.ckpt_path, weights_only=True)
    cfg = json.loads(state["config"])
    for k in ("clip_to_box", "clip_margin", "respect_points", "point_radius", "confidence_quantile", "anchor_kind",
              "anchor_clip", "select"):
        cfg.pop(k)
    state["config"] = json.dumps(cfg)
    state.pop("best_step")
    torch.save(state, first.ckpt_path)
    again = AdaptationTrainer(_cfg(setup, steps=3, method="self-training", work_dir=work, select="fixed"),
                              log=lambda *_: None)
    assert again.resume() and again.step == 2
    changed = AdaptationTrainer(_cfg(setup, steps=3, method="self-training", work_dir=work, clip_to_box=True),
                                log=lambda *_: None)
    with pytest.raises(RuntimeError, match="clip_to_box"):
        changed.resume()


def test_resume_refuses_a_checkpoint_made_on_other_base_weights(setup) -> None:
    work = str(setup[0] / "other-base-work")
    first = AdaptationTrainer(_cfg(setup, steps=2, method="self-training", work_dir=work), log=lambda *_: None)
    first.run(publish=False)
    state = torch.load(first.ckpt_path, weights_only=True)
    assert state["base_sha256"] == first.base.sha256
    state["base_sha256"] = "0" * 64  # as if the same model name now named new weights
    torch.save(state, first.ckpt_path)
    again = AdaptationTrainer(_cfg(setup, steps=3, method="self-training", work_dir=work), log=lambda *_: None)
    with pytest.raises(RuntimeError, match="other base weights"):
        again.resume()
    state.pop("base_sha256")  # checkpoints written before the field existed still resume
    torch.save(state, first.ckpt_path)
    assert again.resume() and again.step == 2


def test_cli_takes_the_v2_options(setup) -> None:
    out = setup[0] / "summary-v2.json"
    p = _wesam_adapt(setup, "--method", "wesam", "--clip-to-box", "--clip-margin", "3", "--confidence-quantile",
                     "0.2", "--anchor-kind", "logit", "--select", "fixed", "--no-publish", "--json", str(out),
                     steps=2)
    stdout, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    summary = json.loads(out.read_text())
    assert summary["select"] == "fixed" and summary["selected_step"] == 2 and summary["speed"]["steps"] == 2
    assert "steps/s" in stdout + err  # the speed line is logged at the end


@pytest.mark.parametrize("method", ["wesam", "oracle"])
def test_decoder_targets_train_the_decoder_lora(setup, method) -> None:
    """With dec_* targets the losses reach the mask decoder's LoRA (the decoder's own weights stay frozen)."""
    a = AdaptationTrainer(_cfg(setup, method=method, lora_targets=("q", "v", "dec_q", "dec_v", "dec_out")),
                          log=lambda *_: None)
    before = {k: v.clone() for k, v in a.sam.state_dict().items()}
    a.train_step()
    a.train_step()  # B starts at zero: A's gradient is zero on the first step, B's is not
    after = a.sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all("lora_" in k for k in changed)
    assert any(k.startswith("mask_decoder.") and "lora_A" in k for k in changed)
    assert any(k.startswith("mask_decoder.") and "lora_B" in k for k in changed)
    assert any(k.startswith("image_encoder.") for k in changed)


def test_cli_publishes_an_adapter_with_its_decoder_lora(setup) -> None:
    p = _wesam_adapt(setup, "--method", "wesam", "--lora-targets", "q", "v", "dec_q", "dec_v", steps=2)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    art = Registry(setup[0] / "cli-reg").resolve("polyp")
    assert art.lora.adapts_decoder and art.lora.decoder_targets == ("dec_q", "dec_v")
    from safetensors.torch import load_file

    keys = set(load_file(str(art.path / "adapter.safetensors")))
    assert any(k.startswith("mask_decoder.transformer.") and k.endswith(".dec_v.lora_B") for k in keys)
