"""Export of adapters with mask-decoder LoRA targets: a decoder graph per such domain, used by the ONNX
runtime, the parity check, the Triton repository and the TensorRT plan. On sam-micro (64 px), real
ONNX Runtime; one export with three domains is shared by the module:

    base   no adapter                                      -> shared decoder.onnx
    polyp  q/v (image encoder only)                        -> shared decoder.onnx
    skin   q/v + dec_q/dec_v (encoder and mask decoder)    -> its own decoder_skin.onnx
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from export_support import one_torch_thread, save_micro_base, wesam_export  # noqa: F401 (fixture)
from service_support import randomise_lora_b

from wesam.adapters.artifact import attach_adapter, save_adapter
from wesam.adapters.lora import (
    LoraConfig,
    add_adapter,
    delete_adapter,
    set_adapter,
)
from wesam.adapters.registry import Registry
from wesam.export.bundle import ExportBundle, read_export
from wesam.export.check import check_export, pooled_iou
from wesam.export.common import ExportError
from wesam.export.prompts import decoder_feeds
from wesam.export.runtime import OnnxSamPredictor, make_session
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import resolve_model

DECODER_ADAPTED = ("q", "v", "dec_q", "dec_v")
ATOL = 1e-4  # what tests/test_export.py allows between ONNX Runtime and PyTorch logits and scores
MIN_IOU = 0.99
SMALL_CHECK = {"image_sizes": ((60, 80), (150, 150)), "prompt_counts": (1, 5)}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-decoder-adapters")


@pytest.fixture(scope="module")
def base_path(work: Path) -> str:
    return save_micro_base(work)


@pytest.fixture(scope="module")
def registry(work: Path, base_path: str) -> Registry:
    """polyp@v1 (encoder-only q/v) and skin@v1 (q/v + decoder q/v), rank 2, random non-zero B."""
    model = resolve_model(base_path)
    reg = Registry(work / "registry")
    for seed, (domain, targets) in enumerate([("polyp", ("q", "v")), ("skin", DECODER_ADAPTED)]):
        add_adapter(model.sam, domain, LoraConfig(rank=2, targets=targets))
        randomise_lora_b(model.sam, domain, seed)  # B starts at zero: the adapter would change nothing
        with reg.staging(domain) as staged:
            save_adapter(staged, model, domain, domain=domain)
        reg.publish(staged, domain)
    return reg


@pytest.fixture(scope="module")
def export_run(work: Path, base_path: str, registry: Registry) -> tuple[ExportBundle, dict]:
    """`wesam export onnx` with both adapters: the bundle and the command's JSON summary."""
    out = work / "onnx"
    rc, stdout, err = wesam_export("onnx", "--model", base_path, "--adapter", "polyp@v1", "--adapter", "skin@v1",
                                   "--registry", str(registry.root), "--out", str(out))
    assert rc == 0, err
    return read_export(out), json.loads(stdout)


@pytest.fixture(scope="module")
def bundle(export_run) -> ExportBundle:
    return export_run[0]


@contextlib.contextmanager
def torch_reference(base_path: str, registry: Registry, ref: str | None):
    """A PyTorch predictor on the base model with adapter ``ref`` attached, unmerged and active."""
    model = resolve_model(base_path)
    name = attach_adapter(model, registry.resolve(ref)) if ref else None
    set_adapter(model.sam, name)
    try:
        yield SamPredictorCore(model.sam)
    finally:
        set_adapter(model.sam, None)
        if name:
            delete_adapter(model.sam, name)


def _prompt_sets(size: tuple[int, int], rng: np.random.Generator) -> list[Prompts]:
    h, w = size
    n = 6
    boxes = np.sort(rng.uniform(0, [w, h], (n, 2, 2)), axis=1).reshape(n, 4).astype(np.float32)
    points = rng.uniform(0, [w, h], (n, 3, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (n, 3)).astype(np.int32)
    labels[:, 0] = 1
    return [Prompts(boxes=boxes), Prompts(points, labels), Prompts(points, labels, boxes)]


# -- onnx export ------------------------------------------------------------------------------------

def test_only_the_decoder_adapted_domain_gets_its_own_decoder(export_run) -> None:
    bundle, summary = export_run
    m = bundle.manifest
    assert summary["domains"] == ["base", "polyp", "skin"]
    assert summary["decoders"] == {"skin": "decoder_skin.onnx"}
    assert {"decoder.onnx", "decoder_skin.onnx", "encoder_skin.onnx"} <= set(summary["files"])
    assert "decoder_polyp.onnx" not in summary["files"] and "decoder_base.onnx" not in summary["files"]
    assert m["format_version"] == 3  # a wesam without per-domain decoders refuses it instead of misreading it
    assert m["decoder"]["file"] == "decoder.onnx" and set(m["decoders"]) == {"skin"}
    own = m["decoders"]["skin"]
    assert own["file"] == "decoder_skin.onnx" and own["simplified"]
    assert (own["inputs"], own["outputs"]) == (m["decoder"]["inputs"], m["decoder"]["outputs"])  # same contract
    assert bundle.decoder_path_for("skin") == bundle.root / "decoder_skin.onnx"
    assert bundle.decoder_path_for("polyp") == bundle.decoder_path_for("base") == bundle.decoder_path
    assert bundle.decoder_path.name == "decoder.onnx"
    assert not list(bundle.root.glob("decoder_polyp*")) and not list(bundle.root.glob("decoder_base*"))
    assert (bundle.root / "decoder_skin.onnx").read_bytes() != bundle.decoder_path.read_bytes()
    assert m["encoders"]["skin"]["adapter"]["lora"]["targets"] == list(DECODER_ADAPTED)
    with pytest.raises(ExportError, match="no encoder for domain 'nope'"):
        bundle.decoder_path_for("nope")  # an unknown domain must not fall back to the shared decoder


def test_domain_decoder_matches_pytorch_with_the_adapter_active(bundle: ExportBundle, base_path: str,
                                                                registry: Registry) -> None:
    ort = OnnxSamPredictor.from_bundle(bundle, "skin")
    shared = make_session(bundle.decoder_path)  # what decoding skin would do without its own decoder
    rng = np.random.default_rng(0)
    # Mask IoU pooled over all cases, as `export check` does: a random-init model makes some empty masks.
    own_iou, shared_iou = np.zeros(2), np.zeros(2)
    largest_shared_diff = 0.0
    with torch_reference(base_path, registry, "skin@v1") as ref:
        for size in [(50, 90), (64, 64), (120, 70)]:
            image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            emb_ort, emb_ref = ort.encode(image), ref.encode(image)
            for prompts in _prompt_sets(size, rng):
                feeds = decoder_feeds(emb_ort.features.numpy(), prompts, size, bundle.img_size, bundle.low_res_size)
                base_masks, _, base_low = shared.run(None, feeds)
                for multimask, sl in ((False, slice(0, 1)), (True, slice(1, 4))):
                    got = ort.decode(emb_ort, prompts, multimask, return_logits=True)
                    want = ref.decode(emb_ref, prompts, multimask, return_logits=True)
                    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=ATOL)
                    np.testing.assert_allclose(got.scores, want.scores, atol=ATOL)
                    own_iou += pooled_iou(got.masks > 0, want.masks > 0)
                    shared_iou += pooled_iou(base_masks[:, sl] > 0, want.masks > 0)
                    largest_shared_diff = max(largest_shared_diff,
                                              float(np.abs(base_low[:, sl] - want.low_res_logits).max()))
    assert own_iou[1] > 0 and own_iou[0] / own_iou[1] >= MIN_IOU
    # The shared decoder gives clearly other masks: the parity above is not a tolerance artefact.
    assert shared_iou[0] / shared_iou[1] < 0.95 and largest_shared_diff > 100 * ATOL


def test_encoder_only_domain_still_uses_the_shared_decoder(bundle: ExportBundle, base_path: str,
                                                           registry: Registry) -> None:
    ort = OnnxSamPredictor.from_bundle(bundle, "polyp")
    rng = np.random.default_rng(1)
    size = (50, 90)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    with torch_reference(base_path, registry, "polyp@v1") as ref:
        emb_ort, emb_ref = ort.encode(image), ref.encode(image)
        for prompts in _prompt_sets(size, rng):
            for multimask in (False, True):
                got = ort.decode(emb_ort, prompts, multimask, return_logits=True)
                want = ref.decode(emb_ref, prompts, multimask, return_logits=True)
                np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=ATOL)
                np.testing.assert_allclose(got.scores, want.scores, atol=ATOL)


def test_a_manifest_without_the_domains_decoder_is_refused(work: Path, bundle: ExportBundle) -> None:
    """Were the entry lost, every reader would decode skin with the shared decoder: refuse instead."""
    broken = work / "no-own-decoder"
    shutil.copytree(bundle.root, broken)
    manifest = json.loads((broken / "export.json").read_text())
    del manifest["decoders"]
    (broken / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="'skin' adapts the mask decoder"):
        read_export(broken)
    (broken / "decoder_skin.onnx").unlink()
    manifest = json.loads((bundle.root / "export.json").read_text())
    (broken / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="decoder_skin.onnx listed in export.json is missing"):
        read_export(broken)


# -- check ------------------------------------------------------------------------------------------

def test_check_passes_with_each_domains_decoder(bundle: ExportBundle, base_path: str) -> None:
    report = check_export(bundle, resolve_model(base_path), threads=1, **SMALL_CHECK)
    assert report["ok"] is True, report["failures"][:3]
    assert report["mask_iou_min"] >= MIN_IOU
    assert {d: r["decoder"] for d, r in report["domains"].items()} == {
        "base": "decoder.onnx", "polyp": "decoder.onnx", "skin": "decoder_skin.onnx"}
    assert {c["domain"] for c in report["cases"]} == {"base", "polyp", "skin"}


def test_check_fails_when_the_shared_decoder_decodes_the_domain(work: Path, bundle: ExportBundle,
                                                                base_path: str) -> None:
    """The check is not vacuous for decoder LoRA: skin decoded by the base decoder must fail."""
    broken = work / "shared-decoder-as-skin"
    shutil.copytree(bundle.root, broken)
    shutil.copyfile(broken / "decoder.onnx", broken / "decoder_skin.onnx")
    report = check_export(read_export(broken), resolve_model(base_path), domains=["skin"], threads=1,
                          **SMALL_CHECK)
    assert report["ok"] is False and report["failures"]
    assert report["encoder_max_abs_diff"] < ATOL  # the encoder is right: the decoder alone fails it


# -- triton -----------------------------------------------------------------------------------------

def test_triton_pipeline_routes_the_domain_to_its_decoder(work: Path, bundle: ExportBundle) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repo = work / "triton"
    rc, stdout, err = wesam_export("triton", str(bundle.root), "--out", str(repo))
    assert rc == 0, err
    models = json.loads(stdout)["models"]
    assert set(models) == {"decoder", "decoder_skin", "encoder_base", "encoder_polyp", "encoder_skin",
                           "pipeline_base", "pipeline_polyp", "pipeline_skin"}
    assert models["decoder_skin"] == {"kind": "decoder", "domain": "skin", "max_batch_size": 0}
    configs = {d.name: text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
               for d in repo.iterdir() if d.is_dir()}
    assert set(configs) == set(models)
    own, shared = configs["decoder_skin"], configs["decoder"]
    assert own.name == "decoder_skin" and own.backend == "onnxruntime" and own.max_batch_size == 0
    assert (list(own.input), list(own.output)) == (list(shared.input), list(shared.output))
    assert (repo / "decoder_skin" / "1" / "model.onnx").read_bytes() == (bundle.root / "decoder_skin.onnx").read_bytes()
    assert (repo / "decoder" / "1" / "model.onnx").read_bytes() == bundle.decoder_path.read_bytes()
    steps = {d: [s.model_name for s in configs[f"pipeline_{d}"].ensemble_scheduling.step]
             for d in ("base", "polyp", "skin")}
    assert steps == {"base": ["encoder_base", "decoder"], "polyp": ["encoder_polyp", "decoder"],
                     "skin": ["encoder_skin", "decoder_skin"]}
    only_polyp = work / "triton-polyp"
    rc, stdout, err = wesam_export("triton", str(bundle.root), "--out", str(only_polyp), "--domain", "polyp")
    assert rc == 0, err
    assert set(json.loads(stdout)["models"]) == {"decoder", "encoder_polyp", "pipeline_polyp"}


# -- tensorrt ---------------------------------------------------------------------------------------

def test_tensorrt_plans_an_engine_for_the_domains_decoder(work: Path, bundle: ExportBundle) -> None:
    """Engines need a GPU; the plan (what is built from which graph) and the int64-size variant of the
    domain's decoder that TensorRT parses are checked here."""
    from wesam.export.tensorrt import engine_plan, integer_size_decoder

    plan = {e.name: e for e in engine_plan(bundle)}
    assert list(plan) == ["encoder_base", "encoder_polyp", "encoder_skin", "decoder", "decoder_skin"]
    assert plan["decoder_skin"].onnx == bundle.root / "decoder_skin.onnx" and plan["decoder_skin"].domain == "skin"
    assert plan["decoder"].onnx == bundle.decoder_path and plan["decoder"].domain is None
    assert [e.name for e in engine_plan(bundle, ["polyp"])] == ["encoder_polyp", "decoder"]

    variant = integer_size_decoder(bundle.decoder_path_for("skin"), work / "trt" / "decoder_skin.onnx")
    rng = np.random.default_rng(3)
    feeds = decoder_feeds(rng.standard_normal((1, 32, 8, 8)).astype(np.float32),
                          Prompts(boxes=[[3.0, 4.0, 40.0, 30.0], [10, 10, 80, 45]]), (50, 90), 64, 32)
    want = make_session(bundle.decoder_path_for("skin")).run(None, feeds)
    got = make_session(variant).run(None, {**feeds, "orig_im_size": feeds["orig_im_size"].astype(np.int64)})
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
