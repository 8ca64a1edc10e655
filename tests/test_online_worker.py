"""The online self-training worker (adapters/online/{samples,filtering,gate,worker}.py, `wesam worker`):
captured samples as training data, reliability filters and client caps, the gate, whole rounds on a
real SQLite store and registry (publish with lineage, cursor, freeze, abort, reset), and real
`wesam worker` processes killed with SIGKILL mid-round and mid-publish, or racing for a domain.

Everything runs on sam-micro (random init, 64 px) with generated images; torch uses one thread
(the tests are small; several threads only contend with whatever else runs on the machine)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from service_support import encode, make_base, publish_adapter, randomise_lora_b

from wesam.adapters.artifact import WEIGHTS_FILE, read_artifact, verify_artifact
from wesam.adapters.lora import LoraConfig, add_adapter, lora_layers
from wesam.adapters.online import CapturedSample, control, open_store
from wesam.adapters.online.filtering import (FilterConfig, SelectionConfig, client_quota, is_holdout, prepare,
                                             select)
from wesam.adapters.online.gate import (GOLDEN_DIR, GateConfig, GateInputs, Tolerances, load_golden,
                                        paired_bootstrap, run_gate)
from wesam.adapters.online.samples import UnusableSample, served_prompts, to_adapt_sample
from wesam.adapters.online.worker import STATE_FILE, OnlineWorker, WorkerConfig
from wesam.adapters.registry import Registry
from wesam.sam.zoo import LoadedModel, resolve_model

ROOT = Path(__file__).resolve().parent.parent
H, W = 48, 64
DOMAIN = "polyp"
T0 = 1_700_000_000.0
# A gate that judges the mechanics of a round, not the quality of a random-init model: any
# candidate not catastrophically worse passes (the gate's own judgement is tested separately).
LENIENT = GateConfig(margin=0.5, resamples=200, with_golden=Tolerances(1.0, 100.0, 1.0, 1.0, 1.0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- data --------------------------------------------------------------------------------------------

def rle(mask: np.ndarray) -> dict[str, Any]:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with one ellipse (its mask), different for every i."""
    rng = np.random.default_rng(i)
    img = rng.integers(40, 110, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (18 + (i * 7) % 28, 16 + (i * 5) % 16), (9 + i % 4, 6 + i % 3), (i * 17) % 180, 0, 360, 1, -1)
    img[mask > 0] = (200, 90 + (i * 13) % 60, 80)
    return img, mask.astype(bool)


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def captured(i: int, client: str = "c0", *, rid: str | None = None, boxes: list | None = None,
             masks: list[np.ndarray] | None = None, scores: list[float] | None = None, points: list | None = None,
             labels: list[int] | None = None, image: np.ndarray | None = None, created: float | None = None,
             **prompt_extra: Any) -> CapturedSample:
    """A sample as the service captures it: one tight box on the ellipse, served mask = the ellipse."""
    img, mask = scene(i)
    if image is not None:
        img = image
    prompts: dict[str, Any] = {"multimask": False}
    if boxes is None:  # boxes=[] for a points-only request
        boxes = [tight_box(mask)]
    if boxes:
        prompts["boxes"] = boxes
    if points is not None:
        prompts["points"], prompts["point_labels"] = points, labels
    n = len(boxes) if boxes else 1
    served = masks if masks is not None else [mask] * n
    prompts["masks"] = [rle(m) for m in served]
    prompts["scores"] = scores if scores is not None else [0.9] * n
    prompts.update(prompt_extra)
    return CapturedSample(request_id=rid or f"req-{i}", domain=DOMAIN, client=client,
                          created=T0 + i if created is None else created, image=encode(img), image_size=(H, W),
                          prompts=prompts, adapter=None, mask_rle=rle(np.logical_or.reduce(served)), score=0.9)


def fill(store, start: int, count: int, clients: int = 5) -> list[str]:
    ids = []
    for i in range(start, start + count):
        s = captured(i, f"c{i % clients}")
        store.add(s)
        ids.append(s.request_id)
    return ids


def write_golden(registry: Path, images: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """A golden set in wesam's folder layout under REGISTRY/<domain>/golden."""
    root = registry / DOMAIN / GOLDEN_DIR
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    stems = []
    for k, (img, mask) in enumerate(images):
        stem = f"g{k}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), img[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask.astype(np.uint8) * 255)
        stems.append(stem)
    (root / "split.json").write_text(json.dumps({"train": stems[:2], "test": stems[2:]}))
    return root


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def base(base_path: Path) -> LoadedModel:
    return resolve_model(str(base_path))


@pytest.fixture
def world(tmp_path: Path, base_path: Path) -> dict[str, Any]:
    """A registry whose domain has v1 active, a golden set, and an empty SQLite store."""
    reg = tmp_path / "registry"
    publish_adapter(base_path, reg, DOMAIN, seed=1, scale=0.05)
    write_golden(reg, [scene(1000 + k) for k in range(4)])
    store = open_store(str(tmp_path / "samples.db"))
    yield {"reg": reg, "store": store, "registry": Registry(reg), "db": tmp_path / "samples.db"}
    store.close()


def worker_config(world: dict[str, Any], base_path: Path, **kw: Any) -> WorkerConfig:
    defaults: dict[str, Any] = dict(domain=DOMAIN, registry=str(world["reg"]), model=str(base_path), min_samples=10,
                                    steps_per_round=2, batch_size=2, min_train=2, gate=LENIENT, progress=False,
                                    filters=FilterConfig(min_score=0.0), interval=0.0)
    defaults.update(kw)
    return WorkerConfig(**defaults)


def run_worker(world: dict[str, Any], base: LoadedModel, base_path: Path, **kw: Any) -> OnlineWorker:
    reports: list[dict[str, Any]] = []
    w = OnlineWorker(worker_config(world, base_path, **kw), world["store"], base=base, log=lambda *_: None,
                     report=reports.append)
    w.reports = reports  # type: ignore[attr-defined]
    return w


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- samples -----------------------------------------------------------------------------------------

def test_captured_samples_become_adapt_samples() -> None:
    s = captured(1)
    a = to_adapt_sample(s)
    img, mask = scene(1)
    assert a.stem == "req-1" and a.image.shape == (H, W, 3) and a.label.kind == "box"
    np.testing.assert_array_equal(a.label.boxes, [tight_box(mask)])
    assert a.instances.shape == (1, H, W) and (a.instances[0] == mask).all()  # the served mask (placeholder)
    # points only: one prompt of K points
    p = to_adapt_sample(captured(2, boxes=[], points=[[30, 20], [2, 2]], labels=[1, 0]))
    assert p.label.kind == "point" and p.label.point_coords.shape == (1, 2, 2) and p.label.boxes is None
    assert p.label.point_labels.tolist() == [[1, 0]]
    # one box with points: both, as served
    b = to_adapt_sample(captured(3, points=[[30, 20]], labels=[1]))
    assert b.label.kind == "box" and b.label.point_coords.shape == (1, 1, 2)
    # several boxes with shared points: the points cannot be attributed, the boxes stay
    img, mask = scene(4)
    two = captured(4, boxes=[tight_box(mask), [1, 1, 10, 10]], masks=[mask, np.zeros_like(mask)], points=[[5, 5]],
                   labels=[1])
    m = to_adapt_sample(two)
    assert m.label.boxes.shape == (2, 4) and m.label.point_coords is None and m.instances.shape == (2, H, W)
    with pytest.raises(UnusableSample) as e:
        to_adapt_sample(captured(5, mask_input=[[0.0]]))
    assert e.value.reason == "mask_input"
    with pytest.raises(UnusableSample) as e:
        to_adapt_sample(captured(6, boxes=[], points=[]))
    assert e.value.reason == "no_prompts"
    broken = dataclasses.replace(captured(7), image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UnusableSample) as e:
        to_adapt_sample(broken)
    assert e.value.reason == "undecodable"
    wrong_size = captured(8, masks=[np.zeros((10, 10), bool)])
    with pytest.raises(UnusableSample) as e:
        served_prompts(wrong_size, (H, W))
    assert e.value.reason == "bad_mask"


# -- filters and caps -----------------------------------------------------------------------------------

def test_reliability_filters_drop_unreliable_and_poisoned_prompts() -> None:
    cfg = FilterConfig()
    img, mask = scene(10)
    box = tight_box(mask)
    full_box = np.zeros_like(mask)
    x0, y0, x1, y1 = (int(v) for v in box)
    full_box[y0:y1 + 1, x0:x1 + 1] = True
    leak = mask.copy()
    leak[:, :5] = True
    cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
    cases = {
        "whole_image_box": captured(10, boxes=[[0, 0, W - 1, H - 1]], masks=[np.ones_like(mask)]),
        "empty_mask": captured(10, masks=[np.zeros_like(mask)]),
        "full_box_mask": captured(10, masks=[full_box]),
        "mask_outside_box": captured(10, masks=[leak]),
        "low_score": captured(10, scores=[0.2]),
        "tiny_box": captured(10, boxes=[[5, 5, 5.5, 20]]),
        "positive_point_outside_mask": captured(10, boxes=[], points=[[cx, cy], [1, 1]], labels=[1, 1]),
        "negative_point_inside_mask": captured(10, boxes=[], points=[[cx, cy], [cx + 1, cy]], labels=[1, 0]),
        "full_image_mask": captured(10, boxes=[], points=[[cx, cy]], labels=[1], masks=[np.ones_like(mask)]),
        "blank_image": captured(10, image=np.full((H, W, 3), 128, np.uint8)),
    }
    for reason, s in cases.items():
        with pytest.raises(UnusableSample) as e:
            prepare(s, cfg)
        assert e.value.reason == reason, reason
    assert len(prepare(captured(10), cfg).prompts) == 1  # the clean one passes
    # A sample keeps its reliable prompts: the whole-image box goes, the tight one stays.
    two = captured(11, boxes=[[0, 0, W - 1, H - 1], tight_box(scene(11)[1])], masks=[np.ones_like(mask), scene(11)[1]],
                   scores=[0.9, 0.9])
    sel = select([two], cfg, SelectionConfig(holdout_fraction=0.0, max_client_share=1.0))
    assert sel.decisions == {"req-11": "used"} and dict(sel.prompts_filtered) == {"whole_image_box": 1}
    np.testing.assert_array_equal(sel.train[0].sample.label.boxes, [tight_box(scene(11)[1])])
    # A repeated sample (same image and prompts, another request id) is a duplicate.
    dup = select([captured(12), captured(12, rid="again")], cfg, SelectionConfig(0.0, 1.0))
    assert dup.decisions == {"req-12": "used", "again": "filtered:duplicate"}


def test_client_quota_holdout_and_deterministic_selection() -> None:
    assert client_quota({"a": 10, "b": 10, "c": 10, "d": 10}, 0.25) == 10
    assert client_quota({"a": 100}, 0.25) == 0  # one client alone never trains a round
    q = client_quota({"m": 30, **{f"h{k}": 7 for k in range(10)}}, 0.25)
    assert q == 23 and q <= 0.25 * (q + 70)
    assert client_quota({"a": 3}, 1.0) == 3
    # holdout: a stable ~20 % of ids
    ids = [f"id-{k}" for k in range(2000)]
    held = [i for i in ids if is_holdout(i, 0.2)]
    assert 0.17 < len(held) / len(ids) < 0.23 and held == [i for i in ids if is_holdout(i, 0.2)]
    # one client floods a round: capped at a quarter of the training samples, the same choice in any order
    samples = [captured(k, "flood" if k < 40 else f"h{k % 6}") for k in range(70)]
    cfg, sc = FilterConfig(), SelectionConfig()
    sel = select(samples, cfg, sc)
    used = [c for c in sel.train]
    flood = sum(c.captured.client == "flood" for c in used)
    assert 0 < flood <= 0.25 * len(used)
    assert all(sum(c.captured.client == k for c in used) <= 0.25 * len(used) for k in {c.captured.client for c in used})
    assert set(sel.decisions) == {s.request_id for s in samples}  # every sample decided once
    counts = sel.counts()
    assert counts["used"] == len(used) and counts["capped"] > 0 and counts.get("holdout", 0) == len(sel.holdout)
    assert not {c.request_id for c in sel.holdout} & {c.request_id for c in used}
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    again = select(shuffled, cfg, sc)
    assert {c.request_id for c in again.train} == {c.request_id for c in used}


# -- trainer hooks ---------------------------------------------------------------------------------------

def test_trainer_starts_from_a_state_and_is_pulled_towards_the_pin(base_path: Path) -> None:
    import copy

    from wesam.adapters.adapt.trainer import ADAPTER, EMA_ADAPTER, AdaptationTrainer, AdaptConfig
    from wesam.adapters.lora import adapter_state

    samples = [prepare(captured(k), FilterConfig(min_score=0.0)).sample for k in range(6)]
    model = resolve_model(str(base_path))
    other = resolve_model(str(base_path))
    add_adapter(other.sam, "p", LoraConfig(rank=2))
    randomise_lora_b(other.sam, "p", seed=3, scale=0.05)
    pin = (LoraConfig(rank=2), {k: v.clone() for k, v in adapter_state(other.sam, "p").items()})
    cfg = AdaptConfig(data="-", domain=DOMAIN, registry=None, steps=3, batch_size=2, lr=1e-2, warmup_steps=1,
                      ema_decay=0.9, val_fraction=0.0, select="fixed", pull=1e-9,
                      lora_targets=WorkerConfig.lora_targets)  # encoder-only, as the worker's pin

    def trainer(**kw: Any) -> AdaptationTrainer:
        return AdaptationTrainer(dataclasses.replace(cfg, **kw.pop("cfg", {})), log=lambda *_: None,
                                 data=(samples, [], "fp"), model=copy.deepcopy(model), **kw)

    t = trainer(init=pin, pin=pin)
    for name in (ADAPTER, EMA_ADAPTER):  # student and teacher start at the given state
        got = adapter_state(t.sam, name)
        assert set(got) == set(pin[1]) and all(torch.equal(got[k], pin[1][k]) for k in got)
    assert t.drift() == 0.0
    # Drift compares effective updates scale * B @ A, so a pin of another rank (2 vs 4) works:
    # from zero (B = 0) the drift is ||dW_pin|| / ||W0 + dW_pin|| over the adapted slices.
    z = trainer(pin=pin)
    num = den = 0.0
    for layer in lora_layers(other.sam):
        for key in layer.keys_of("p"):
            s0, s1 = layer.slices[key]
            dw = layer.delta_weight(key).detach()
            num += float((dw ** 2).sum())
            den += float(((layer.base.weight[s0:s1] + dw) ** 2).sum())
    assert z.drift() == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert trainer(cfg={"pull": 0.0}).drift() is None  # no pull, no pin
    # A strong pull keeps the adapter closer to the pin than a negligible one.
    drifts = {}
    for pull in (1e-9, 1e4):
        t = trainer(init=pin, pin=pin, cfg={"pull": pull})
        for _ in range(3):
            terms = t.train_step()
        assert terms["drift"] >= 0 and "pull" in terms
        drifts[pull] = t.drift()
    assert 0 < drifts[1e4] < drifts[1e-9], drifts


# -- the gate -----------------------------------------------------------------------------------------

def test_paired_bootstrap() -> None:
    mean, lo, hi = paired_bootstrap(np.full(7, -0.1), 500, 0.95, seed=0)
    assert mean == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)
    d = np.random.default_rng(0).normal(0.02, 0.05, 40)
    a, b = paired_bootstrap(d, 2000, 0.95, seed=3), paired_bootstrap(d, 2000, 0.95, seed=3)
    assert a == b and a[1] < a[0] < a[2]  # seeded, and the interval brackets the mean


def test_gate_passes_an_identical_candidate_and_rejects_a_clearly_worse_one(base_path: Path) -> None:
    from wesam.adapters.lora import adapter_state, load_adapter_state, use_adapter
    from wesam.data.folder import Sample
    from wesam.data.weak import boxes_from_masks
    from wesam.sam.predictor import Prompts, SamPredictorCore

    model = resolve_model(str(base_path))
    sam = model.sam
    for name in ("active", "same", "worse"):
        add_adapter(sam, name, LoraConfig(rank=2))
    randomise_lora_b(sam, "active", seed=1, scale=0.05)
    load_adapter_state(sam, "same", adapter_state(sam, "active"))
    randomise_lora_b(sam, "worse", seed=9, scale=3.0)
    # A golden set the active adapter segments perfectly: each mask is a fixed point of "predict
    # from the mask's tight box" under the active adapter (iterated from a scene's ellipse), so the
    # active adapter scores IoU 1 with the gate's box prompts and only a candidate can lose.
    pred = SamPredictorCore(sam)
    golden = []
    with use_adapter(sam, "active"):
        for k in range(12):
            img, gt = scene(200 + k)
            for _ in range(10):
                nxt = pred.predict(img, Prompts(boxes=boxes_from_masks(gt[None]))).masks[0, 0]
                if not nxt.any():
                    break
                if (nxt == gt).all():
                    golden.append(Sample(f"g{k}", img, gt[None], "", ""))
                    break
                gt = nxt
    assert len(golden) >= 6
    holdout = [prepare(captured(300 + k), FilterConfig(min_score=0.0)) for k in range(10)]
    same = run_gate(GateInputs(sam, "same", "active", golden, holdout), GateConfig(resamples=500))
    assert same["pass"] and same["golden"]["delta"] == 0.0 and same["golden"]["ci_low"] == 0.0, same
    assert {"weak_agreement", "area_drift", "empty_rate", "full_rate", "flip_stability"} <= set(same["checks"])
    for check in same["checks"].values():
        assert {"active", "candidate", "threshold", "pass"} <= set(check)
    json.dumps(same)  # JSON-able
    worse = run_gate(GateInputs(sam, "worse", "active", golden, holdout), GateConfig(resamples=500))
    assert not worse["pass"] and "golden_noninferiority" in worse["failed"], worse
    assert worse["golden"]["active_miou"] == 1.0 and worse["golden"]["ci_low"] < -0.1
    # Without a golden set the label-free checks decide alone, and too little held-out evidence fails.
    none = run_gate(GateInputs(sam, "same", "active", None, holdout[:2]), GateConfig())
    assert not none["pass"] and none["failed"] == ["holdout_evidence"] and none["strict"]
    lf = run_gate(GateInputs(sam, "same", "active", None, holdout), GateConfig())
    assert lf["pass"] and lf["tolerances"] == dataclasses.asdict(GateConfig().without_golden)
    # Non-finite weights fail before anything else is measured.
    with torch.no_grad():
        lora_layers(sam)[0].lora_B[lora_layers(sam)[0].keys_of("same")[0]].weight[0, 0] = float("nan")
    bad = run_gate(GateInputs(sam, "same", "active", golden, holdout), GateConfig())
    assert not bad["pass"] and bad["failed"] == ["finite_weights"]


def test_golden_set_uses_every_split(tmp_path: Path) -> None:
    write_golden(tmp_path, [scene(k) for k in range(5)])
    golden = load_golden(tmp_path, DOMAIN)
    assert golden is not None and len(golden) == 5 and all(g.instances.shape[0] >= 1 for g in golden)
    assert load_golden(tmp_path, "other") is None


# -- rounds --------------------------------------------------------------------------------------------

def test_a_round_publishes_with_lineage_and_never_retrains_its_samples(world, base, base_path) -> None:
    store, reg = world["store"], world["registry"]
    ids = fill(store, 0, 24)
    before = metric("wesam_worker_rounds_total", domain=DOMAIN, outcome="published")
    with run_worker(world, base, base_path) as w:
        rep = w.run_round()
        assert rep["outcome"] == "published", rep
        assert rep["published"] == f"{DOMAIN}@v2" and reg.active_version(DOMAIN) == 2
        art = reg.resolve(f"{DOMAIN}@v2")
        assert verify_artifact(art, base)["ok"] and art.meta["method"] == "online-wesam"
        lin = art.meta["lineage"]
        n_used = rep["samples"]["used"]
        assert n_used >= 2 and lin["samples"]["count"] == n_used
        assert lin["parent"] == lin["replaces"] == lin["pinned"] == f"{DOMAIN}@v1"  # pinned: active at first start
        # the same decisions again (selection is deterministic): the fingerprint is of these ids
        again_sel = select([store.get(i) for i in ids], FilterConfig(min_score=0.0), SelectionConfig())
        train_ids = sorted(c.request_id for c in again_sel.train)
        assert len(train_ids) == n_used
        assert lin["samples"]["fingerprint"] == hashlib.sha256("\n".join(train_ids).encode()).hexdigest()
        assert lin["samples"]["first"] >= T0 and lin["samples"]["last"] <= T0 + 23
        assert lin["gate"]["pass"] and lin["gate"]["golden"]["n_images"] == 4 and lin["round"] == 1
        assert lin["worker"]["pid"] == os.getpid()
        assert art.meta["metrics"]["after"]["miou"] == lin["gate"]["golden"]["candidate_miou"]
        assert metric("wesam_worker_rounds_total", domain=DOMAIN, outcome="published") == before + 1
        assert metric("wesam_worker_active_version", domain=DOMAIN) == 2
        # the samples are consumed: nothing new, nothing retrained
        again = w.run_round()
        assert again["outcome"] == "waiting" and again["new_samples"] == 0
    state = json.loads((world["reg"] / DOMAIN / STATE_FILE).read_text())
    assert state["round"] == 1 and state["cursor"] == T0 + 23 and state["pending"] is None
    assert state["last_publish"]["version"] == 2 and state["samples"]["used"] == n_used
    # a restarted worker continues from the cursor: it reads only what arrived since
    fill(store, 24, 12)
    with run_worker(world, base, base_path) as w:
        rep = w.run_round()
        assert rep["new_samples"] == 12 and rep["round"] == 2 and rep["outcome"] == "published", rep
        assert reg.resolve(f"{DOMAIN}@v3").meta["lineage"]["parent"] == f"{DOMAIN}@v2"


def test_a_domain_without_an_adapter_starts_from_the_base_model(tmp_path, base, base_path) -> None:
    reg = tmp_path / "registry"
    write_golden(reg, [scene(1000 + k) for k in range(4)])
    with open_store(str(tmp_path / "samples.db")) as store:
        fill(store, 0, 12)
        world = {"reg": reg, "store": store}
        with run_worker(world, base, base_path) as w:
            rep = w.run_round()
    assert rep["outcome"] == "published" and rep["active"] is None and rep["start"] is None, rep
    # a first adapter is encoder-only (the worker's lora_targets), whatever `wesam adapt` defaults to
    assert Registry(reg).resolve(f"{DOMAIN}@v1").lora.targets == WorkerConfig.lora_targets == ("q", "v")
    lin = Registry(reg).resolve(f"{DOMAIN}@v1").meta["lineage"]
    assert lin["parent"] is None and lin["pinned"] is None and lin["replaces"] is None
    assert Registry(reg).active_version(DOMAIN) == 1


def test_a_decoder_adapter_is_trained_as_it_is(tmp_path, base, base_path) -> None:
    """An active adapter with mask-decoder LoRA (`wesam adapt`'s default targets) goes through a
    round unchanged in kind: the candidate keeps its targets, and its decoder weights train too."""
    from safetensors.torch import load_file

    reg = tmp_path / "registry"
    targets = ("q", "v", "dec_q", "dec_k", "dec_v", "dec_out")
    publish_adapter(base_path, reg, DOMAIN, seed=1, scale=0.05, targets=targets)
    write_golden(reg, [scene(1000 + k) for k in range(4)])
    with open_store(str(tmp_path / "samples.db")) as store:
        fill(store, 0, 12)
        with run_worker({"reg": reg, "store": store}, base, base_path) as w:
            rep = w.run_round()
    assert rep["outcome"] == "published" and rep["published"] == f"{DOMAIN}@v2", rep
    registry = Registry(reg)
    v1, v2 = registry.resolve(f"{DOMAIN}@v1"), registry.resolve(f"{DOMAIN}@v2")
    assert v2.lora.targets == targets and v2.lora.adapts_decoder and verify_artifact(v2, base)["ok"]
    before, after = (load_file(str(a.path / WEIGHTS_FILE)) for a in (v1, v2))
    assert before.keys() == after.keys()
    decoder_keys = [k for k in after if k.startswith("mask_decoder.")]
    assert decoder_keys and any(not torch.equal(before[k], after[k]) for k in decoder_keys)


def test_late_samples_are_read_once(world, base, base_path) -> None:
    store = world["store"]
    fill(store, 0, 12)
    with run_worker(world, base, base_path, min_samples=12) as w:
        assert w.run_round()["new_samples"] == 12
        # A sample served earlier but stored late (queued in the capture thread) is filed at the
        # domain's newest time, not before the cursor: the next round still sees it, once.
        store.add(captured(100, created=T0 + 3))
        fill(store, 12, 11)
        rep = w.run_round()
        assert rep["new_samples"] == 12, rep
        assert w.run_round()["new_samples"] == 0


def test_frozen_domain_skips_rounds(world, base, base_path) -> None:
    fill(world["store"], 0, 12)
    control.freeze(world["registry"], DOMAIN, reason="investigating")
    with run_worker(world, base, base_path) as w:
        rep = w.run_round()
    assert rep["outcome"] == "frozen" and rep["reason"] == "investigating"
    assert world["registry"].versions(DOMAIN) == [1]
    assert json.loads((world["reg"] / DOMAIN / STATE_FILE).read_text())["cursor"] is None  # nothing consumed
    control.unfreeze(world["registry"], DOMAIN)
    with run_worker(world, base, base_path) as w:
        assert w.run_round()["new_samples"] == 12


def test_non_finite_loss_aborts_without_publishing(world, base, base_path) -> None:
    fill(world["store"], 0, 12)
    before = metric("wesam_worker_rounds_total", domain=DOMAIN, outcome="aborted")
    with run_worker(world, base, base_path, lr=1e30, steps_per_round=3) as w:  # diverges at once
        rep = w.run_round()
    assert rep["outcome"] == "aborted" and "non-finite" in rep["error"], rep
    assert world["registry"].versions(DOMAIN) == [1] and world["registry"].active_version(DOMAIN) == 1
    assert not list((world["reg"] / DOMAIN).glob(".staging-*"))
    assert metric("wesam_worker_rounds_total", domain=DOMAIN, outcome="aborted") == before + 1
    assert json.loads((world["reg"] / DOMAIN / STATE_FILE).read_text())["consecutive_rejections"] == 1


def test_repeated_rejections_reset_training_to_the_pinned_adapter(world, base, base_path) -> None:
    store, reg = world["store"], world["registry"]
    publish_adapter(base_path, world["reg"], DOMAIN, seed=2, scale=0.05)  # v2 active
    control.pin(reg, DOMAIN, 1)
    never = dataclasses.replace(LENIENT, margin=-1.0)  # demands +1 mIoU: no candidate passes
    outcomes, starts = [], []
    with run_worker(world, base, base_path, gate=never, reset_after=2, steps_per_round=1) as w:
        for k in range(3):
            fill(store, 12 * k, 12)
            rep = w.run_round()
            outcomes.append(rep["outcome"])
            starts.append(rep["start"])
            assert rep["pinned"] == f"{DOMAIN}@v1"
    assert outcomes == ["rejected", "reset", "rejected"], outcomes
    assert starts == [f"{DOMAIN}@v2", f"{DOMAIN}@v2", f"{DOMAIN}@v1"]
    assert reg.versions(DOMAIN) == [1, 2] and reg.active_version(DOMAIN) == 2
    assert metric("wesam_worker_consecutive_rejections", domain=DOMAIN) == 3


@pytest.mark.parametrize("change", ["freeze", "rollback"])
def test_a_freeze_or_rollback_during_the_round_wins_over_its_publish(world, base, base_path, monkeypatch,
                                                                     change) -> None:
    reg = world["registry"]
    publish_adapter(base_path, world["reg"], DOMAIN, seed=2, scale=0.05, activate=False)  # v2, not active
    fill(world["store"], 0, 12)
    monkeypatch.setenv("WESAM_WORKER_TEST_PUBLISH_DELAY_S", "0.01")

    def log(line: str) -> None:  # the operator acts while the new version waits in staging
        if "test hook" in line:
            if change == "freeze":
                control.freeze(reg, DOMAIN, reason="stop")
            else:
                reg.activate(DOMAIN, 2)

    w = OnlineWorker(worker_config(world, base_path), world["store"], base=base, log=log, report=lambda r: None)
    with w:
        rep = w.run_round()
    assert rep["outcome"] == "aborted" and "not published" in rep["error"], rep
    assert reg.versions(DOMAIN) == [1, 2] and not list((world["reg"] / DOMAIN).glob(".staging-*"))
    state = json.loads((world["reg"] / DOMAIN / STATE_FILE).read_text())
    assert state["round"] == 1 and state["consecutive_rejections"] == 0 and state["pending"] is None


def test_start_cleans_stale_staging_and_commits_a_published_pending_round(world, base, base_path) -> None:
    d = world["reg"] / DOMAIN
    old, new = d / ".staging-old", d / ".staging-new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fill(world["store"], 0, 12)
    with run_worker(world, base, base_path) as w:
        assert not old.exists() and new.exists()  # younger ones may belong to a live writer
        assert w.run_round()["outcome"] == "published"
    # Pretend the worker died after renaming v2 into place but before committing its state: the
    # state on disk is the one before the round, with the round's result pending on its run id.
    state = json.loads((d / STATE_FILE).read_text())
    run = world["registry"].lineage(DOMAIN, 2)["run"]
    committed = {k: v for k, v in state.items() if k != "version"}
    stale = {**state, "round": 0, "cursor": None, "cursor_seen": [], "pending": {"run": run, "state": committed}}
    (d / STATE_FILE).write_text(json.dumps(stale))
    with run_worker(world, base, base_path) as w:
        assert w.state.round == 1 and w.state.cursor == state["cursor"] and w.state.pending is None
        assert w.run_round()["new_samples"] == 0
    # A pending round whose version never appeared (killed before the rename) is dropped.
    stale["pending"]["run"] = "no-such-run"
    (d / STATE_FILE).write_text(json.dumps(stale))
    with run_worker(world, base, base_path) as w:
        assert w.state.round == 0 and w.state.pending is None and w.run_round()["new_samples"] == 12


def test_cli_options_default_to_the_config_defaults() -> None:
    from wesam.adapters.online.cli import worker_config as from_args
    from wesam.cli import build_parser

    args = build_parser().parse_args(["worker", "--domain", DOMAIN, "--registry", "r"])
    assert from_args(args) == WorkerConfig(DOMAIN, "r")
    args = build_parser().parse_args(["worker", "--domain", DOMAIN, "--ema-decay", "0", "--max-drift", "0",
                                      "--max-client-share", "1", "--no-clip-to-box", "--min-score", "0.3"])
    cfg = from_args(args)
    assert cfg.ema_decay is None and cfg.gate.max_drift is None and cfg.selection.max_client_share == 1.0
    assert not cfg.clip_to_box and cfg.respect_points and cfg.filters.min_score == 0.3


# -- real worker processes ---------------------------------------------------------------------------

def _worker_cmd(world: dict[str, Any], base_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wesam.cli", "worker", "--domain", DOMAIN, "--registry", str(world["reg"]),
            "--store", str(world["db"]), "--model", str(base_path), "--threads", "1", "--metrics-port", "0",
            "--min-samples", "10", "--min-train", "2", "--batch-size", "2", "--margin", "0.5", "--no-progress",
            *extra]


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 240.0) -> list[str]:
    """Read the process's stderr until a line contains ``text`` (fails if it exits first)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"worker exited ({proc.wait()}) before {text!r}:\n{''.join(lines)}")
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} within {timeout}s:\n{''.join(lines)}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _registry_is_valid(reg: Registry) -> None:
    """Every vN is a complete, verified artifact and routing names one of them."""
    for v in reg.versions(DOMAIN):
        art = read_artifact(reg.path(DOMAIN, v))
        assert verify_artifact(art)["ok"], (v, verify_artifact(art))
    assert reg.active_version(DOMAIN) in reg.versions(DOMAIN)


def test_kill_9_mid_round_and_mid_publish_leaves_a_valid_registry(world, base_path) -> None:
    fill(world["store"], 0, 24)
    reg = world["registry"]
    # Mid-round: killed while training.
    proc = _start(_worker_cmd(world, base_path, "--once", "--steps-per-round", "100000"))
    try:
        _wait_for(proc, "training")
    finally:
        _kill(proc)
    _registry_is_valid(reg)
    assert reg.versions(DOMAIN) == [1]
    # Mid-publish: the version is fully written in its staging directory, not yet renamed.
    proc = _start(_worker_cmd(world, base_path, "--once", "--steps-per-round", "1"),
                  env={"WESAM_WORKER_TEST_PUBLISH_DELAY_S": "600"})
    try:
        _wait_for(proc, "test hook: sleeping")
    finally:
        _kill(proc)
    _registry_is_valid(reg)
    assert reg.versions(DOMAIN) == [1] and len(list((world["reg"] / DOMAIN).glob(".staging-*"))) == 1
    state = json.loads((world["reg"] / DOMAIN / STATE_FILE).read_text())
    assert state["round"] == 0 and state["cursor"] is None  # the round never happened
    # A restarted worker trains those samples again, then publishes.
    done = subprocess.run(_worker_cmd(world, base_path, "--once", "--steps-per-round", "1"), cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    rep = json.loads(done.stdout.strip().splitlines()[-1])
    assert rep["outcome"] == "published" and rep["new_samples"] == 24, rep
    _registry_is_valid(reg)
    assert reg.versions(DOMAIN) == [1, 2] and reg.active_version(DOMAIN) == 2


def test_two_workers_for_one_domain_never_both_run(world, base_path) -> None:
    fill(world["store"], 0, 12)
    first = _start(_worker_cmd(world, base_path, "--rounds", "1000", "--interval", "30"))
    try:
        _wait_for(first, "lease")  # holds the lease (it logs it once it has it)
        second = subprocess.run(_worker_cmd(world, base_path, "--once"), cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert second.returncode == 75, (second.returncode, second.stderr)
        assert "held by" in second.stderr and str(first.pid) in second.stderr
        assert second.stdout == ""  # it ran no round
    finally:
        _kill(first)
