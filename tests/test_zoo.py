"""Checkpoint loading: official layouts, hash checks, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wesam.sam.zoo import (
    ZOO,
    ModelLoadError,
    _reference_state,
    describe,
    load_checkpoint,
    resolve_model,
    save_safetensors,
    sha256_file,
)


def _zeros_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict with the exact key layout of an official checkpoint (cheap: no random init)."""
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in _reference_state(ZOO[name].config).items()}


@pytest.fixture(scope="module")
def vit_b_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_01ec64.pth"
    sd = _zeros_state("vit_b")
    sd["mask_decoder.iou_prediction_head.layers.2.bias"] = torch.arange(4, dtype=torch.float32)
    torch.save(sd, path)
    return path


def test_generated_vit_b_layout_loads_and_is_recognised(vit_b_ckpt: Path) -> None:
    m = load_checkpoint(vit_b_ckpt)
    assert m.name == "vit_b"
    assert m.config == ZOO["vit_b"].config
    assert m.sha256 == sha256_file(vit_b_ckpt)
    assert torch.equal(m.sam.mask_decoder.iou_prediction_head.layers[2].bias, torch.arange(4.0))


def test_official_name_checks_published_hash(vit_b_ckpt: Path) -> None:
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch.*sam_vit_b_01ec64.pth"):
        load_checkpoint(vit_b_ckpt, name="vit_b")
    m = load_checkpoint(vit_b_ckpt, name="vit_b", expected_sha256=sha256_file(vit_b_ckpt))
    assert m.name == "vit_b"


def test_official_name_via_checkpoint_dir(vit_b_ckpt: Path, monkeypatch) -> None:
    monkeypatch.setenv("WESAM_CHECKPOINT_DIR", str(vit_b_ckpt.parent))
    assert describe(ZOO["vit_b"])["available"] is True
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        resolve_model("vit_b")


def test_wrong_architecture_is_refused(vit_b_ckpt: Path) -> None:
    digest = sha256_file(vit_b_ckpt)
    with pytest.raises(ModelLoadError, match="does not match the vit_l architecture.*missing keys"):
        load_checkpoint(vit_b_ckpt, name="vit_l", expected_sha256=digest)


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    sd = _zeros_state("sam-micro")
    del sd["image_encoder.neck.0.weight"]
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="match no zoo model"):
        load_checkpoint(path)
    with pytest.raises(ModelLoadError, match="1 missing keys.*image_encoder.neck.0.weight"):
        load_checkpoint(path, name="sam-micro")


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    sd = _zeros_state("sam-micro")
    sd["image_encoder.pos_embed"] = torch.zeros(1, 9, 9, 32)
    path = tmp_path / "bad_shape.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="image_encoder.pos_embed: expected"):
        load_checkpoint(path, name="sam-micro")


def test_truncated_checkpoint_is_refused(vit_b_ckpt: Path, tmp_path: Path) -> None:
    data = vit_b_ckpt.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("unpickled!",))


def test_pickled_objects_are_never_unpickled(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint("/nonexistent/sam.pth")
    with pytest.raises(ModelLoadError, match="unknown model 'vit_x'"):
        resolve_model("vit_x")


def test_official_model_without_checkpoint_explains(monkeypatch) -> None:
    monkeypatch.delenv("WESAM_CHECKPOINT_DIR", raising=False)
    with pytest.raises(ModelLoadError, match="--checkpoint.*WESAM_CHECKPOINT_DIR"):
        resolve_model("vit_h")


def test_safetensors_round_trip_keeps_architecture(tmp_path: Path) -> None:
    m = resolve_model("sam-micro", seed=3)
    path = tmp_path / "micro.safetensors"
    digest = save_safetensors(m.sam, path, name="my-micro", config=m.config)
    loaded = resolve_model(str(path))
    assert loaded.name == "my-micro" and loaded.sha256 == digest and loaded.config == m.config
    for (k, a), (_, b) in zip(m.sam.state_dict().items(), loaded.sam.state_dict().items()):
        assert torch.equal(a, b), k


def test_sam_micro_is_seeded() -> None:
    a, b = resolve_model("sam-micro", seed=1), resolve_model("sam-micro", seed=1)
    wa = a.sam.mask_decoder.output_upscaling[0].weight
    assert torch.equal(wa, b.sam.mask_decoder.output_upscaling[0].weight)
    c = resolve_model("sam-micro", seed=2)
    assert not torch.equal(wa, c.sam.mask_decoder.output_upscaling[0].weight)


def test_describe_is_json_serialisable() -> None:
    for spec in ZOO.values():
        json.dumps(describe(spec))
    assert describe(ZOO["sam-mini"])["parameters"]["image_encoder"] < 5_000_000
