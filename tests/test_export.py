"""Export layer: merged weights, ONNX graphs and their parity check, TensorRT guard, Triton repository,
benchmark. All on sam-micro (64 px); one ONNX export and one check run are shared by the module."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export_support import one_torch_thread, save_micro_base, wesam_export  # noqa: F401 (fixture)
from service_support import randomise_lora_b

from wesam.adapters.artifact import META_FILE, attach_adapter, save_adapter
from wesam.adapters.lora import LoraConfig, add_adapter, set_adapter
from wesam.adapters.registry import Registry
from wesam.export.bundle import read_export
from wesam.export.check import check_export, pooled_iou
from wesam.export.common import ExportError
from wesam.export.prompts import decoder_feeds
from wesam.export.runtime import make_session
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import SAM_MICRO, build_sam, resolve_model, save_safetensors, sha256_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def base_path(work: Path) -> str:
    return save_micro_base(work)


@pytest.fixture(scope="module")
def registry(work: Path, base_path: str) -> Registry:
    """Registry with polyp@v1: a rank-2 q/v adapter with random B (big enough to change masks)."""
    model = resolve_model(base_path)
    add_adapter(model.sam, "a", LoraConfig(rank=2))
    randomise_lora_b(model.sam, "a", seed=0)
    reg = Registry(work / "registry")
    with reg.staging("polyp") as staged:
        save_adapter(staged, model, "a", domain="polyp")
    reg.publish(staged, "polyp")
    return reg


@pytest.fixture(scope="module")
def onnx_dir(work: Path, base_path: str, registry: Registry) -> Path:
    out = work / "onnx"
    rc, stdout, err = wesam_export("onnx", "--model", base_path, "--adapter", "polyp@v1",
                                   "--registry", str(registry.root), "--out", str(out))
    assert rc == 0, err
    assert json.loads(stdout)["domains"] == ["base", "polyp"]
    return out


@pytest.fixture(scope="module")
def check_run(work: Path, onnx_dir: Path, base_path: str) -> tuple[int, dict, dict]:
    """One full `export check` (all default cases, both domains): rc, stdout summary, full report."""
    full = work / "check.json"
    rc, stdout, err = wesam_export("check", str(onnx_dir), "--model", base_path, "--threads", "1",
                                   "--json", str(full))
    assert rc in (0, 1), err
    return rc, json.loads(stdout), json.loads(full.read_text())


def _encoder_out(sam, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sam.image_encoder(x)


# -- merged -----------------------------------------------------------------------------------------

def test_merged_equals_unmerged_lora_and_loads_in_segment_anything(work: Path, base_path: str,
                                                                   registry: Registry) -> None:
    out = work / "merged"
    rc, stdout, err = wesam_export("merged", "--model", base_path, "--adapter", "polyp@v1",
                                   "--registry", str(registry.root), "--out", str(out))
    assert rc == 0, err
    summary = json.loads(stdout)
    path = Path(summary["file"])
    assert path.name == "sam-micro_polyp_v1.safetensors" and path.is_file()

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = resolve_model(base_path)
    plain_base = _encoder_out(reference.sam, x)
    name = attach_adapter(reference, registry.resolve("polyp@v1"))
    set_adapter(reference.sam, name)  # LoRA active and *unmerged*: the reference computation
    want = _encoder_out(reference.sam, x)
    assert (want - plain_base).abs().max() > 1e-2  # the adapter matters, so equality below means something

    merged = resolve_model(str(path))  # wesam loads it
    assert merged.name == "sam-micro+polyp@v1" and merged.sha256 == summary["sha256"]
    torch.testing.assert_close(_encoder_out(merged.sam, x), want, atol=1e-5, rtol=1e-4)

    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert not [k for k in sd if "lora" in k or ".base." in k]
    plain = build_sam(SAM_MICRO)  # segment_anything classes, no wesam loading code
    plain.load_state_dict(sd, strict=True)
    torch.testing.assert_close(_encoder_out(plain.eval(), x), want, atol=1e-5, rtol=1e-4)

    manifest = json.loads((out / "merged.json").read_text())
    art = registry.resolve("polyp@v1")
    assert manifest["sha256"] == sha256_file(path)
    assert manifest["base_model"]["sha256"] == reference.sha256 and manifest["base_model"]["name"] == "sam-micro"
    assert manifest["adapter"]["ref"] == "polyp@v1"
    assert manifest["adapter"]["adapter_json_sha256"] == sha256_file(art.path / META_FILE)
    assert manifest["adapter"]["meta"]["lora"]["rank"] == 2


def test_merged_sam_leaves_the_model_bit_identical(base_path: str, registry: Registry) -> None:
    from wesam.adapters.artifact import merged_sam
    from wesam.adapters.lora import adapter_names, plain_state_dict

    model = resolve_model(base_path)
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    plain = merged_sam(model, registry.resolve("polyp@v1"))
    after = plain_state_dict(model.sam)
    assert adapter_names(model.sam) == [] and set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed)  # q/v LoRA lives in qkv only


def test_merged_refuses_adapter_of_another_base(work: Path, registry: Registry) -> None:
    rc, _, err = wesam_export("merged", "--model", "sam-micro", "--adapter", "polyp@v1",
                              "--registry", str(registry.root), "--out", str(work / "bad"))
    assert rc == 2 and "error:" in err and "base model mismatch" in err
    assert not (work / "bad" / "merged.json").exists()


# -- onnx -------------------------------------------------------------------------------------------

def test_onnx_manifest(onnx_dir: Path, base_path: str, registry: Registry) -> None:
    m = json.loads((onnx_dir / "export.json").read_text())
    art = registry.resolve("polyp@v1")
    assert m["base_model"]["name"] == "sam-micro" and m["base_model"]["sha256"] == sha256_file(base_path)
    assert m["opset"] == 17 and m["wesam_version"]
    assert m["preprocessing"]["img_size"] == 64
    assert m["preprocessing"]["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert m["preprocessing"]["pixel_std"] == pytest.approx([58.395, 57.12, 57.375])
    assert m["encoders"]["base"]["adapter"] is None
    polyp = m["encoders"]["polyp"]["adapter"]
    assert polyp["ref"] == "polyp@v1" and polyp["sha256"] == art.meta["files"]["adapter.safetensors"]
    enc = m["encoders"]["polyp"]
    assert enc["inputs"] == {"image": {"dtype": "float32", "shape": ["batch", 3, 64, 64]}}
    assert enc["outputs"] == {"image_embeddings": {"dtype": "float32", "shape": ["batch", 32, 8, 8]}}
    dec = m["decoder"]
    assert dec["inputs"]["point_coords"]["shape"] == ["num_prompts", "num_points", 2]
    assert dec["inputs"]["orig_im_size"] == {"dtype": "float32", "shape": [2]}  # segment-anything's contract
    assert m["format_version"] == 2 and "resized input frame" in m["decoder_contract"]["point_coords"]
    # q/v adapters leave the mask decoder alone: one shared decoder, no per-domain decoders.
    assert "decoders" not in m and sorted(p.name for p in onnx_dir.glob("decoder*")) == ["decoder.onnx"]
    assert read_export(onnx_dir).decoder_path_for("polyp") == onnx_dir / "decoder.onnx"
    assert dec["outputs"]["masks"]["shape"] == ["num_prompts", 4, "height", "width"]
    assert dec["outputs"]["low_res_masks"]["shape"] == ["num_prompts", 4, 32, 32]
    for g in [*m["encoders"].values(), dec]:
        assert all((onnx_dir / f).is_file() for f in g["files"]) and g["simplified"]


def test_onnx_refuses_to_overwrite_a_foreign_directory(work: Path, base_path: str) -> None:
    out = work / "not-an-export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = wesam_export("onnx", "--model", base_path, "--out", str(out))
    assert rc == 2 and "refusing to overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("n", [1, 5, 64])
def test_decoder_handles_prompt_counts(onnx_dir: Path, base_path: str, n: int) -> None:
    model = resolve_model(base_path)
    pred = SamPredictorCore(model.sam)
    dec = make_session(onnx_dir / "decoder.onnx")
    rng = np.random.default_rng(n)
    image = rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)
    emb = pred.encode(image)
    corners = np.sort(rng.uniform(0, [90, 50], (n, 2, 2)), axis=1)
    points = rng.uniform(0, [90, 50], (n, 4, 2))
    labels = rng.integers(0, 2, (n, 4))
    for prompts in (Prompts(boxes=corners.reshape(n, 4)), Prompts(points, labels),
                    Prompts(points, labels, corners.reshape(n, 4))):
        feeds = decoder_feeds(emb.features.numpy(), prompts, (50, 90), 64, 32)
        masks, iou, low = dec.run(None, feeds)
        assert masks.shape == (n, 4, 50, 90) and iou.shape == (n, 4) and low.shape == (n, 4, 32, 32)
        for multimask, sl in ((False, slice(0, 1)), (True, slice(1, 4))):
            want = pred.decode(emb, prompts, multimask, return_logits=True)
            np.testing.assert_allclose(low[:, sl], want.low_res_logits, atol=1e-4)
            np.testing.assert_allclose(iou[:, sl], want.scores, atol=1e-4)
            inter, union = pooled_iou(masks[:, sl] > 0, want.masks > 0)
            assert union > 0 and inter / union >= 0.99


def _official_feeds(embedding: np.ndarray, points: np.ndarray | None, labels: np.ndarray | None,
                    box: np.ndarray | None, size: tuple[int, int], img_size: int) -> dict[str, np.ndarray]:
    """Inputs laid out as segment-anything's ONNX notebook does (one prompt, N = 1), written here from
    its documented steps rather than with wesam's helpers: points, then the box corners or a padding
    point, mapped with ResizeLongestSide.apply_coords; float32 orig_im_size; no mask input."""
    from segment_anything.utils.transforms import ResizeLongestSide

    coords = np.zeros((0, 2)) if points is None else points
    labs = np.zeros(0) if labels is None else labels
    if box is None:
        coords, labs = np.concatenate([coords, [[0.0, 0.0]]]), np.concatenate([labs, [-1]])
    else:
        coords, labs = np.concatenate([coords, box.reshape(2, 2)]), np.concatenate([labs, [2, 3]])
    coords = ResizeLongestSide(img_size).apply_coords(coords[None], size).astype(np.float32)
    low = embedding.shape[-1] * 4
    return {"image_embeddings": embedding, "point_coords": coords, "point_labels": labs[None].astype(np.float32),
            "mask_input": np.zeros((1, 1, low, low), np.float32), "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(size, dtype=np.float32)}


def _official_export(sam, path: Path, size: tuple[int, int]) -> None:
    """segment-anything's scripts/export_onnx_model.py for this model (all four masks), traced with an
    example ``orig_im_size`` of ``size``: traced by current PyTorch, that graph's crop is only right at
    the example size (export/onnx_graphs.py, DecoderGraph.mask_postprocessing)."""
    from segment_anything.utils.onnx import SamOnnxModel

    c, g = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    dummy = (torch.randn(1, c, *g), torch.randint(0, 64, (1, 5, 2), dtype=torch.float),
             torch.randint(0, 4, (1, 5), dtype=torch.float), torch.randn(1, 1, 4 * g[0], 4 * g[1]),
             torch.tensor([1.0]), torch.tensor(size, dtype=torch.float))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(SamOnnxModel(sam, return_single_mask=False), dummy, str(path), dynamo=False,
                          opset_version=17, do_constant_folding=True, input_names=OFFICIAL_INPUTS,
                          output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})


OFFICIAL_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                   "orig_im_size"]


def test_decoder_is_a_drop_in_for_segment_anythings_onnx_export(work: Path, onnx_dir: Path, base_path: str) -> None:
    """A client written for the official export (feeds as its notebook builds them) gets from our
    decoder.onnx what the official module (SamOnnxModel, eager), the official graph (ONNX Runtime, at
    the size it was traced for) and segment_anything's own SamPredictor give."""
    from segment_anything import SamPredictor
    from segment_anything.utils.onnx import SamOnnxModel

    model = resolve_model(base_path)
    ours = make_session(onnx_dir / "decoder.onnx")
    official_module = SamOnnxModel(model.sam, return_single_mask=False).eval()
    predictor = SamPredictor(model.sam)
    rng = np.random.default_rng(7)
    for size in [(50, 90), (97, 61), (64, 64)]:
        official = work / f"official_decoder_{size[0]}x{size[1]}.onnx"
        _official_export(model.sam, official, size)
        theirs = make_session(official)
        assert [(i.name, i.type) for i in ours.get_inputs()] == [(i.name, i.type) for i in theirs.get_inputs()]
        assert [o.name for o in ours.get_outputs()] == [o.name for o in theirs.get_outputs()]
        image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        predictor.set_image(image)
        embedding = predictor.get_image_embedding().numpy()
        h, w = size
        box = np.sort(rng.uniform(0, [w, h], (2, 2)), axis=0).reshape(4)
        points, labels = rng.uniform(0, [w, h], (3, 2)), np.array([1.0, 0.0, 1.0])
        for p, lab, b in [(None, None, box), (points, labels, None), (points, labels, box)]:
            feeds = _official_feeds(embedding, p, lab, b, size, model.config.img_size)
            got = ours.run(None, feeds)
            eager = official_module(*[torch.from_numpy(feeds[k]) for k in OFFICIAL_INPUTS])
            for a, b_, c in zip(got, theirs.run(None, feeds), eager):
                np.testing.assert_allclose(a, b_, atol=1e-4)
                np.testing.assert_allclose(a, c.numpy(), atol=1e-4)
            masks, iou, low = got
            assert masks.shape == (1, 4, h, w)
            for multimask, sl in ((False, slice(0, 1)), (True, slice(1, 4))):
                ref_masks, ref_iou, ref_low = predictor.predict(p, None if lab is None else lab.astype(int), b,
                                                                multimask_output=multimask, return_logits=True)
                np.testing.assert_allclose(iou[0, sl], ref_iou, atol=1e-4)
                np.testing.assert_allclose(low[0, sl], ref_low, atol=1e-4)
                inter, union = pooled_iou(masks[0, sl] > 0, ref_masks > 0)
                assert union > 0 and inter / union >= 0.99


def test_tensorrt_decoder_variant_takes_an_integer_size(work: Path, onnx_dir: Path) -> None:
    """TensorRT needs integer shape-tensor inputs: the rewritten graph answers as the float one does."""
    from wesam.export.tensorrt import integer_size_decoder

    path = integer_size_decoder(onnx_dir / "decoder.onnx", work / "trt" / "decoder.onnx")
    session = make_session(path)
    assert {i.name: i.type for i in session.get_inputs()}["orig_im_size"] == "tensor(int64)"
    assert integer_size_decoder(path, work / "trt" / "again.onnx") == path  # already integer: unchanged
    rng = np.random.default_rng(3)
    feeds = decoder_feeds(rng.standard_normal((1, 32, 8, 8)).astype(np.float32),
                          Prompts(boxes=[[3.0, 4.0, 40.0, 30.0], [10, 10, 80, 45]]), (50, 90), 64, 32)
    want = make_session(onnx_dir / "decoder.onnx").run(None, feeds)
    got = session.run(None, {**feeds, "orig_im_size": feeds["orig_im_size"].astype(np.int64)})
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_exports_of_the_old_decoder_contract_are_refused(work: Path, onnx_dir: Path) -> None:
    old = work / "old-export"
    shutil.copytree(onnx_dir, old)
    manifest = json.loads((old / "export.json").read_text())
    (old / "export.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ExportError, match="original pixels.*export again"):
        read_export(old)


def test_encoder_export_with_window_padding_and_dynamic_batch(work: Path) -> None:
    """Grid 12 with window 5 pads windows inside the encoder, as ViT-B/L/H do (grid 64, window 14)."""
    from dataclasses import replace

    from wesam.export.onnx_graphs import export_encoder

    config = replace(SAM_MICRO, img_size=96, window_size=5)
    torch.manual_seed(0)
    sam = build_sam(config)
    info = export_encoder(sam, work / "pad" / "encoder.onnx", simplify=False)
    sess = make_session(info.path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 96, 96)
        got = sess.run(None, {"image": x.numpy()})[0]
        np.testing.assert_allclose(got, _encoder_out(sam, x).numpy(), atol=1e-4)


def test_large_model_path_uses_external_data_through_to_triton(work: Path, base_path: str, monkeypatch) -> None:
    """ViT-H (>2 GB) cannot be tested here: lower the threshold so sam-micro takes the same path."""
    from wesam.export import onnx_graphs
    from wesam.export.bundle import export_onnx
    from wesam.export.triton import build_repository

    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_THRESHOLD", 1)
    bundle = export_onnx(resolve_model(base_path), [], work / "external", simplify=False)
    enc = bundle.manifest["encoders"]["base"]
    assert enc["external_data"] and enc["files"] == ["encoder_base.onnx", "encoder_base.onnx.data"]
    import onnx

    graph = onnx.load(str(work / "external" / "encoder_base.onnx"), load_external_data=False).graph
    outside = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert outside and all(t.external_data[0].value == "encoder_base.onnx.data" for t in outside)
    build_repository(bundle, work / "external-triton")
    version = work / "external-triton" / "encoder_base" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["encoder_base.onnx.data", "model.onnx"]
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    want = make_session(bundle.encoder_path("base")).run(None, {"image": x})[0]
    np.testing.assert_array_equal(make_session(version / "model.onnx").run(None, {"image": x})[0], want)


# -- check ------------------------------------------------------------------------------------------

def test_check_parity_on_sam_micro(check_run) -> None:
    rc, summary, full = check_run
    assert rc == 0 and summary["ok"] is True, summary["failures"][:3]
    assert summary["mask_iou_min"] >= 0.99 and summary["encoder_max_abs_diff"] < 1e-4
    assert set(summary["domains"]) == {"base", "polyp"} and summary["domains"]["polyp"]["adapter"] == "polyp@v1"
    assert {d["decoder"] for d in summary["domains"].values()} == {"decoder.onnx"}
    assert "cases" not in summary and summary["n_cases"] == len(full["cases"]) == 2 * 4 * 3 * 5
    assert {c["prompts"] for c in full["cases"]} == {1, 5, 64}
    assert {c["kind"] for c in full["cases"]} == {"box", "points", "box+points", "points+mask", "mask"}
    assert len({tuple(c["image"]) for c in full["cases"]}) == 4


def test_check_detects_a_wrong_encoder(work: Path, onnx_dir: Path, base_path: str) -> None:
    """The check is not vacuous: the base encoder shipped as the polyp encoder must fail."""
    broken = work / "broken"
    shutil.copytree(onnx_dir, broken)
    shutil.copyfile(broken / "encoder_base.onnx", broken / "encoder_polyp.onnx")
    report = check_export(read_export(broken), resolve_model(base_path), domains=["polyp"], threads=1,
                          image_sizes=((60, 80),), prompt_counts=(5,), prompt_kinds=("box", "points"))
    assert report["ok"] is False and report["failures"]
    assert report["encoder_max_abs_diff"] > 1e-2


def test_check_refuses_another_base_model(work: Path, onnx_dir: Path) -> None:
    # Default model = the recorded name, sam-micro, which resolves to random init (no hash).
    rc, stdout, err = wesam_export("check", str(onnx_dir))
    assert rc == 2 and stdout == "" and "error: base model mismatch" in err
    other = resolve_model("sam-micro", seed=5)
    path = work / "other.safetensors"
    save_safetensors(other.sam, path, name="sam-micro", config=other.config)
    rc, _, err = wesam_export("check", str(onnx_dir), "--model", str(path))
    assert rc == 2 and "base model mismatch" in err and sha256_file(path) in err


def test_check_rejects_a_directory_that_is_no_export(work: Path) -> None:
    rc, _, err = wesam_export("check", str(work / "nowhere"))
    assert rc == 2 and "export.json" in err


# -- tensorrt ---------------------------------------------------------------------------------------

def test_tensorrt_without_tensorrt_stops_clearly(onnx_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    rc, stdout, err = wesam_export("tensorrt", str(onnx_dir))
    assert rc == 2 and stdout == "" and "error: TensorRT is not installed" in err


def test_tensorrt_without_gpu_stops_clearly(onnx_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = wesam_export("tensorrt", str(onnx_dir))
    assert rc == 2 and "no CUDA GPU is visible" in err
    assert not (onnx_dir / "tensorrt").exists()


# -- triton -----------------------------------------------------------------------------------------

def _onnx_io(path: Path) -> dict[str, list[int]]:
    """name -> dims (-1 for symbolic) of a graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for v in [*graph.input, *graph.output]:
        out[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
    return out


def _full_dims(config, tensor) -> list[int]:
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


def _dims_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def test_triton_repository(work: Path, onnx_dir: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repo = work / "triton"
    rc, stdout, err = wesam_export("triton", str(onnx_dir), "--out", str(repo))
    assert rc == 0, err
    assert set(json.loads(stdout)["models"]) == {"decoder", "encoder_base", "encoder_polyp", "pipeline_base",
                                                 "pipeline_polyp"}
    configs = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        config = text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == d.name and (d / "1").is_dir()
        configs[d.name] = config
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        assert config.backend == "onnxruntime" and config.instance_group
        io_dims = _onnx_io(repo / name / "1" / "model.onnx")
        tensors = [*config.input, *config.output]
        assert {t.name for t in tensors} == set(io_dims)  # every graph input/output, nothing else
        for t in tensors:
            assert _full_dims(config, t) == io_dims[t.name], (name, t.name)
        if name.startswith("encoder_"):
            assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
        else:
            assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    for domain in ("base", "polyp"):
        pipe = configs[f"pipeline_{domain}"]
        assert pipe.platform == "ensemble" and pipe.max_batch_size == 0
        # Walk the steps as Triton validates them: every mapped name exists on the step model, every
        # consumed tensor is produced earlier with compatible full dims, every output is produced.
        known = {t.name: _full_dims(pipe, t) for t in pipe.input}
        steps = pipe.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [f"encoder_{domain}", "decoder"]
        for step in steps:
            model = configs[step.model_name]
            inputs = {t.name: _full_dims(model, t) for t in model.input}
            outputs = {t.name: _full_dims(model, t) for t in model.output}
            assert set(step.input_map) == set(inputs)
            for key, tensor in step.input_map.items():
                assert _dims_agree(known[tensor], inputs[key]), (step.model_name, key)
            for key, tensor in step.output_map.items():
                known[tensor] = outputs[key]
        for t in pipe.output:
            assert _dims_agree(known[t.name], _full_dims(pipe, t))
    manifest = json.loads((repo / "wesam_triton.json").read_text())
    assert manifest["domains"] == ["base", "polyp"] and manifest["preprocessing"]["img_size"] == 64


# -- benchmark and entry point ----------------------------------------------------------------------

def test_benchmark_runs_on_sam_micro(work: Path) -> None:
    from wesam.bench import export_speed as bench

    out = work / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = bench.main(["--model", "sam-micro", "--iters", "1", "--warmup", "0", "--threads", "1",
                         "--prompts", "1,5", "--json", str(out), "--no-results"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "sam-micro" and result["img_size"] == 64
    for row in [result["encoder"], *result["decoder"]]:
        assert row["torch"]["median_ms"] > 0 and row["onnxruntime"]["median_ms"] > 0 and row["speedup"] > 0
    assert [r["prompts"] for r in result["decoder"]] == [1, 5]


def test_standalone_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "wesam.export.cli", "export", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "merged" in r.stdout and "triton" in r.stdout
