"""Previews of non-active adapter versions (``domain@vN`` in a request), without a server: the router's
LRU of preview handles, its unload safety while a batch uses a handle, promotion on activation, and
the engine's answers (masks of the version asked for, image_id checks, never captured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_support import corrupt_weights, make_base, make_image, publish_adapter, reference_model

from wesam.adapters.lora import adapter_names
from wesam.adapters.ref import AdapterRef
from wesam.adapters.registry import Registry
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.service.config import ConfigError, ServeConfig
from wesam.service.engine import SegmentEngine
from wesam.service.errors import ServiceError, to_service_error
from wesam.service.messages import InferItem, PromptArrays
from wesam.service.previews import Preview, PreviewCache
from wesam.service.router import AdapterRouter
from wesam.service.runtime import AdapterHandle, TorchRuntime

BOX = np.array([[8, 6, 50, 40]], np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """sam-micro and a registry with polyp v1 (active), v2, v3, v4 and a broken v5."""
    root = tmp_path_factory.mktemp("previews")
    base = make_base(root)
    reg = root / "registry"
    for seed in (1, 7, 8, 9, 10):
        publish_adapter(base, reg, "polyp", seed=seed, activate=seed == 1)
    corrupt_weights(reg, "polyp", 5)
    return base, reg


class Counting:
    """A TorchRuntime's loader and unloader that record what they were called with."""

    def __init__(self, base: Path) -> None:
        self.runtime = TorchRuntime(reference_model(base), "cpu")
        self.loaded: list[str] = []
        self.unloaded: list[str] = []

    def load(self, art, merged):
        handle = self.runtime.load_adapter(art, merged)
        self.loaded.append(str(art.ref))
        return handle

    def unload(self, handle: AdapterHandle) -> None:
        self.unloaded.append(str(handle.ref))
        self.runtime.unload_adapter(handle)


def _router(world, tmp_path: Path, slots: int = 2) -> tuple[AdapterRouter, Counting]:
    base, reg = world
    own = tmp_path / "registry"  # activation writes routing.json: each test gets its own copy
    import shutil

    shutil.copytree(reg, own)
    rt = Counting(base)
    router = AdapterRouter(str(own), rt.load, rt.unload, preview_slots=slots)
    router.refresh()
    return router, rt


def _error(call) -> ServiceError:
    with pytest.raises(Exception) as e:
        call()
    return to_service_error(e.value)


def test_preview_lru_loads_once_and_unloads_the_least_recently_used(world, tmp_path: Path) -> None:
    router, rt = _router(world, tmp_path, slots=2)
    assert rt.loaded == ["polyp@v1"]
    active = router.resolve("polyp@v1")  # the active version: its slot, nothing loaded
    assert not active.preview and active.key == router.resolve("polyp").key and rt.loaded == ["polyp@v1"]
    assert router.peek("polyp@v2") is None  # not loaded: peek never loads

    v2 = router.resolve("polyp@v2")
    assert v2.preview and v2.adapter == "polyp@v2" and v2.domain == "polyp" and v2.handle.ref == AdapterRef("polyp", 2)
    sha = Registry(router.registry.root).resolve("polyp@v2").meta["files"]["adapter.safetensors"]
    assert v2.key == f"polyp@v2:{sha[:16]}" and v2.key != active.key  # cache keys carry the weights' hash
    assert router.resolve("polyp@v2").handle is v2.handle and router.peek("polyp@v2").key == v2.key
    router.resolve("polyp@v3")
    assert rt.loaded == ["polyp@v1", "polyp@v2", "polyp@v3"] and rt.unloaded == []

    router.resolve("polyp@v2")  # v2 is now the most recently used: v3 goes first
    router.resolve("polyp@v4")
    assert rt.unloaded == ["polyp@v3"]
    status = router.previews.status()
    assert [p["adapter"] for p in status["loaded"]] == ["polyp@v4", "polyp@v2"] and status["slots"] == 2
    assert (status["loads"], status["evictions"]) == (3, 1) and len(router.previews) == 2
    assert router.resolve("polyp").adapter == "polyp@v1"  # previews never change what the domain serves
    assert [row["serving"] for row in router.status()] == ["polyp@v1"]

    router.refresh(force=True)  # a forced reload starts previews afresh
    assert sorted(rt.unloaded) == ["polyp@v2", "polyp@v3", "polyp@v4"] and len(router.previews) == 0


def test_a_pinned_preview_is_unloaded_only_when_its_batch_releases_it(world, tmp_path: Path) -> None:
    router, rt = _router(world, tmp_path, slots=1)
    v2 = router.acquire("polyp@v2")  # an encoder batch resolved v2 and will encode with it
    v3 = router.acquire("polyp@v3")  # a later item of the same batch evicts v2 from the LRU ...
    assert rt.unloaded == [] and "polyp@v2" in router.previews.status()["retiring"]
    assert v2.handle.name in adapter_names(rt.runtime.model.sam)  # still attached: the batch can encode with it
    # ... and an item asking for v2 again gets the same handle back (no second copy), evicting v3
    again = router.acquire("polyp@v2")
    assert again.handle is v2.handle and rt.loaded.count("polyp@v2") == 1
    assert "polyp@v3" in router.previews.status()["retiring"] and rt.unloaded == []
    for route in (v2, v3, again):
        router.release(route)
    assert rt.unloaded == ["polyp@v3"]  # v3's last pin went: unloaded now; v2 stays (the LRU's one entry)
    assert "polyp@v3" not in adapter_names(rt.runtime.model.sam)
    assert [p["adapter"] for p in router.previews.status()["loaded"]] == ["polyp@v2"]
    assert router.previews.status()["loaded"][0]["in_use"] == 0


def test_activating_a_previewed_version_promotes_its_handle(world, tmp_path: Path) -> None:
    router, rt = _router(world, tmp_path, slots=2)
    v3 = router.resolve("polyp@v3")
    assert router.activate("polyp", 3) == {"domain": "polyp", "serving": "polyp@v3", "previous": "polyp@v1"}
    assert rt.loaded.count("polyp@v3") == 1 and router.slots["polyp"].handle is v3.handle  # not loaded twice
    assert len(router.previews) == 0 and rt.unloaded == ["polyp@v1"]
    now = router.resolve("polyp@v3")
    assert not now.preview and now.key == v3.key  # the same weights: the same cache keys
    # The same through the registry watcher (`wesam adapters activate` on another host).
    router.resolve("polyp@v2")
    Registry(router.registry.root).activate("polyp", 2)
    assert router.refresh()["loaded"] == ["polyp@v2"] and rt.loaded.count("polyp@v2") == 1
    assert len(router.previews) == 0 and router.resolve("polyp").adapter == "polyp@v2"


def test_preview_errors(world, tmp_path: Path) -> None:
    router, rt = _router(world, tmp_path, slots=2)
    for domain, status, kind, words in (
            ("polyp@v9", 404, "unknown_version", "polyp@v9 is not in the registry; versions: v1, v2, v3, v4, v5"),
            ("lung@v1", 404, "unknown_domain", "'lung'"),
            ("polyp@2", 400, "invalid_adapter_ref", "expected vN"),
            ("polyp@v0", 400, "invalid_adapter_ref", "invalid version"),
            ("bad.name@v1", 400, "invalid_adapter_ref", "invalid domain name"),
            ("polyp@v5", 409, "adapter_refused", "SHA-256")):
        err = _error(lambda: router.resolve(domain))
        assert (err.status, err.kind) == (status, kind) and words in err.message, err.to_json()
    assert len(router.previews) == 0 and "polyp@v5" not in rt.loaded
    assert router.resolve("polyp").adapter == "polyp@v1"  # a refused preview changes nothing

    off, rt_off = _router(world, tmp_path / "off", slots=0)
    err = _error(lambda: off.resolve("polyp@v2"))
    assert (err.status, err.kind) == (409, "preview_disabled") and "PREVIEW_SLOTS=0" in err.message
    assert off.resolve("polyp@v1").adapter == "polyp@v1"  # naming the active version needs no preview slot
    assert _error(lambda: off.resolve("polyp@v9")).kind == "unknown_version"
    with pytest.raises(ConfigError, match="PREVIEW_SLOTS"):
        ServeConfig(preview_slots=-1)


def test_preview_cache_alone() -> None:
    unloaded: list[str] = []
    cache = PreviewCache(1, lambda handle: unloaded.append(str(handle.ref)))

    def entry(v: int) -> Preview:
        ref = AdapterRef("d", v)
        return Preview(ref, "0" * 64, AdapterHandle(ref))

    assert cache.add(entry(1)) == [] and cache.add(entry(2)) == [AdapterRef("d", 1)] and unloaded == ["d@v1"]
    cache.pin(AdapterRef("d", 2))
    cache.add(entry(3))  # v2 is pinned: retired, not unloaded
    assert unloaded == ["d@v1"] and AdapterRef("d", 2) in cache and len(cache) == 1
    promoted = cache.take(AdapterRef("d", 2))  # became active while pinned: the unpin then does nothing
    assert promoted is not None and AdapterRef("d", 2) not in cache
    cache.unpin(AdapterRef("d", 2))
    assert unloaded == ["d@v1"]
    assert cache.drop() == [AdapterRef("d", 3)] and unloaded == ["d@v1", "d@v3"]
    with pytest.raises(ValueError):
        PreviewCache(-1, lambda handle: None)


# -- the engine -------------------------------------------------------------------------------------

def _engine(world, **over) -> SegmentEngine:
    base, reg = world
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, poll_seconds=0, **over)
    return SegmentEngine.from_config(config)


def _want(world, img: np.ndarray, ref: str):
    base, reg = world
    return SamPredictorCore(reference_model(base, reg, ref).sam).predict(img, Prompts(boxes=BOX))


def test_a_batch_of_previews_beyond_the_slots_is_each_served_by_its_version(world) -> None:
    engine = _engine(world, preview_slots=1)
    img = make_image(seed=2)
    domains = ["polyp@v2", "polyp@v3", "polyp", "polyp@v4", "polyp@v1", "polyp@v2"]
    results = engine.infer([InferItem(image=img, domain=d, prompts=PromptArrays(boxes=BOX)) for d in domains],
                           batch=True)
    assert [r.adapter for r in results] == ["polyp@v2", "polyp@v3", "polyp@v1", "polyp@v4", "polyp@v1", "polyp@v2"]
    for r in results:
        assert r.error is None and r.domain == "polyp"
        np.testing.assert_array_equal(r.masks, _want(world, img, r.adapter).masks)
    assert len({r.image_id for r in results}) == 4  # one embedding per version
    previews = engine.status()["previews"]
    assert [p["adapter"] for p in previews["loaded"]] == ["polyp@v2"] and previews["retiring"] == []
    assert engine.router.resolve("polyp").adapter == "polyp@v1"


def test_preview_image_ids_answer_only_their_version(world) -> None:
    engine = _engine(world)
    img = make_image(seed=3)
    (emb,) = engine.infer([InferItem(image=img, domain="polyp@v2")])
    assert emb.error is None and emb.adapter == "polyp@v2" and not emb.cached

    def follow(domain):
        return engine.infer([InferItem(image_id=emb.image_id, domain=domain, prompts=PromptArrays(boxes=BOX))])[0]

    for domain in ("polyp@v2", None):
        r = follow(domain)
        assert r.error is None and r.cached and r.adapter == "polyp@v2"
        np.testing.assert_array_equal(r.masks, _want(world, img, "polyp@v2").masks)
    for domain in ("polyp@v3", "polyp"):  # another version, or the domain's active one: refused
        r = follow(domain)
        assert r.error["kind"] == "domain_mismatch" and "embedded with polyp@v2" in r.error["error"], r.error
    # the same image sent again for the preview finds its embedding (prepare peeks, never loads)
    (again,) = engine.infer([InferItem(image=img, domain="polyp@v2", prompts=PromptArrays(boxes=BOX))])
    assert again.cached and again.image_id == emb.image_id
    (bad,) = engine.infer([InferItem(image=img, domain="polyp@vX", prompts=PromptArrays(boxes=BOX))])
    assert (bad.error["status"], bad.error["kind"]) == (400, "invalid_adapter_ref")
    (gone,) = engine.infer([InferItem(image=img, domain="polyp@v9", prompts=PromptArrays(boxes=BOX))])
    assert (gone.error["status"], gone.error["kind"]) == (404, "unknown_version")


def test_previews_are_not_captured(world, tmp_path: Path) -> None:
    engine = _engine(world, capture_store=str(tmp_path / "samples.db"), capture_domains=("polyp",))
    try:
        img = make_image(seed=4)
        for i, domain in enumerate(("polyp@v2", "polyp@v1", "polyp")):
            (r,) = engine.infer([InferItem(image=img, domain=domain, request_id=f"r{i}",
                                           prompts=PromptArrays(boxes=BOX))])
            assert r.error is None
        assert engine.capture.flush(30)
        # naming a version, even the active one, is an operator's preview: counted, never kept
        assert engine.capture.outcomes[("polyp", "preview")] == 2
        assert engine.capture.outcomes[("polyp", "stored")] == 1
    finally:
        engine.close()


def test_versions_describe_each_adapter_json(world) -> None:
    engine = _engine(world)
    engine.infer([InferItem(image=make_image(), domain="polyp@v3")])
    out = engine.versions("polyp")
    assert out["domain"] == "polyp" and out["active"] == 1 and out["serving"] == "polyp@v1"
    rows = {row["version"]: row for row in out["versions"]}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[1]["active"] and rows[1]["serving"] and not rows[1]["previewed"]
    assert rows[3]["previewed"] and not rows[3]["active"]
    assert rows[2]["adapter"] == "polyp@v2" and rows[2]["created"] and rows[2]["base_model"] == "sam-micro"
    assert len(rows[2]["weights_sha256"]) == 64 and rows[2]["lineage"] is None and rows[2]["lora"]["rank"] == 2
    for domain, kind in (("lung", "unknown_domain"), ("..", "invalid_adapter_ref")):
        assert _error(lambda: engine.versions(domain)).kind == kind
