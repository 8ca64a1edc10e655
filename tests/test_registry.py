"""Adapter artifacts and the registry: round trip, tamper detection, atomic publish, routing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wesam.adapters.artifact import AdapterError, attach_adapter, read_artifact, save_adapter, verify_artifact
from wesam.adapters.lora import LoraConfig, add_adapter, lora_layers, use_adapter
from wesam.adapters.registry import Registry, parse_ref
from wesam.sam.zoo import resolve_model, save_safetensors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def base(tmp_path: Path):
    """sam-micro saved to a file, so it has a SHA-256 like real bases."""
    m = resolve_model("sam-micro", seed=0)
    path = tmp_path / "micro.safetensors"
    save_safetensors(m.sam, path, name="sam-micro", config=m.config)
    return resolve_model(str(path))


def _trained_adapter(model, name: str = "a", seed: int = 0) -> None:
    add_adapter(model.sam, name, LoraConfig(rank=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model.sam):
            for key in layer.keys_of(name):
                layer.lora_B[key].weight.copy_(torch.randn(layer.lora_B[key].weight.shape, generator=g))


def test_artifact_round_trip(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    art = save_adapter(tmp_path / "art", base, "a", domain="polyp",
                       extra={"method": "wesam", "prompt": "box", "metrics": {"after": {"miou": 0.7}}})
    meta = json.loads((tmp_path / "art" / "adapter.json").read_text())
    assert meta["base_model"]["sha256"] == base.sha256 and meta["lora"]["rank"] == 2
    x = torch.randn(1, 3, 64, 64)
    with use_adapter(base.sam, "a"):
        want = base.sam.image_encoder(x)
    fresh = resolve_model(base.source)
    name = attach_adapter(fresh, read_artifact(art.path))
    with use_adapter(fresh.sam, name):
        torch.testing.assert_close(fresh.sam.image_encoder(x), want)


def test_tampered_adapter_is_caught(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    art = save_adapter(tmp_path / "art", base, "a", domain="polyp")
    data = bytearray((art.path / "adapter.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (art.path / "adapter.safetensors").write_bytes(bytes(data))
    report = verify_artifact(read_artifact(art.path), base)
    assert not report["ok"] and "SHA-256 differs" in report["problems"][0]
    with pytest.raises(AdapterError, match="refusing adapter"):
        attach_adapter(resolve_model(base.source), read_artifact(art.path))


def test_adapter_for_another_base_is_refused(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    art = save_adapter(tmp_path / "art", base, "a", domain="polyp")
    other = resolve_model("sam-micro", seed=5)  # same architecture, different weights
    with pytest.raises(AdapterError, match="base model mismatch"):
        attach_adapter(other, read_artifact(art.path))


def _publish(reg: Registry, model, domain: str) -> int:
    with reg.staging(domain) as staged:
        save_adapter(staged, model, "a", domain=domain)
    return reg.publish(staged, domain).version


def test_publish_versions_and_routing(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    reg = Registry(tmp_path / "reg")
    assert [_publish(reg, base, "polyp") for _ in range(3)] == [1, 2, 3]
    assert reg.versions("polyp") == [1, 2, 3] and reg.domains() == ["polyp"]
    assert reg.resolve("polyp").version == 3 and reg.resolve("polyp@v2").version == 2
    assert reg.active_version("polyp") == 3
    reg.activate("polyp", 1)
    assert reg.active_version("polyp") == 1
    assert json.loads((tmp_path / "reg" / "routing.json").read_text()) == {"polyp": "v1"}
    with pytest.raises(AdapterError, match="not in registry"):
        reg.activate("polyp", 9)
    with pytest.raises(AdapterError, match="versions: v1, v2, v3"):
        reg.resolve("polyp@v7")
    with pytest.raises(AdapterError, match="invalid version"):
        parse_ref("polyp@7")


def test_failure_inside_staging_publishes_nothing(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RuntimeError):
        with reg.staging("polyp") as staged:
            save_adapter(staged, base, "a", domain="polyp")
            raise RuntimeError("training diverged")
    assert reg.versions("polyp") == [] and reg.domains() == []
    assert list((tmp_path / "reg" / "polyp").iterdir()) == []


def test_killed_writer_leaves_no_version(base, tmp_path: Path) -> None:
    reg_dir = tmp_path / "reg"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from wesam.adapters.registry import Registry
        reg = Registry({str(reg_dir)!r})
        with reg.staging("polyp") as staged:
            (staged / "adapter.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert r.returncode == -9
    reg = Registry(reg_dir)
    assert reg.versions("polyp") == [] and reg.domains() == []
    with pytest.raises(AdapterError, match="no adapter for domain"):
        reg.resolve("polyp")


def test_cli_adapters_and_eval_with_adapter(base, tmp_path: Path) -> None:
    _trained_adapter(base)
    reg = Registry(tmp_path / "reg")
    _publish(reg, base, "polyp")
    _publish(reg, base, "polyp")

    def wesam(*args):
        return subprocess.run([sys.executable, "-m", "wesam.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    r = wesam("adapters", "list", "--registry", str(reg.root), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["adapter"], x["active"]) for x in rows] == [("polyp@v1", False), ("polyp@v2", True)]
    r = wesam("adapters", "--registry", str(reg.root), "activate", "polyp", "v1")
    assert r.returncode == 0 and reg.active_version("polyp") == 1
    r = wesam("adapters", "verify", "polyp@v2", "--registry", str(reg.root), "--model", base.source)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = wesam("adapters", "verify", "polyp@v2", "--registry", str(reg.root), "--model", "sam-micro")
    assert r.returncode == 1 and "base model mismatch" in r.stdout

    # a tiny dataset for eval
    import cv2
    import numpy as np
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    img = np.full((40, 50, 3), 30, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:35] = 255
    cv2.imwrite(str(data / "images" / "a.png"), img)
    cv2.imwrite(str(data / "masks" / "a.png"), mask)
    (data / "split.json").write_text(json.dumps({"train": [], "test": ["a"]}))
    out = tmp_path / "eval.json"
    r = wesam("eval", "--model", base.source, "--adapter", "polyp@v2", "--registry", str(reg.root),
              "--data", str(data), "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["adapter"] == "polyp@v2"
    r = wesam("eval", "--model", "sam-micro", "--adapter", "polyp", "--registry", str(reg.root),
              "--data", str(data), "--quiet")
    assert r.returncode == 2 and "base model mismatch" in r.stderr


def test_adapter_ref_is_the_one_spelling_of_domain_at_version() -> None:
    from wesam.adapters.errors import InvalidAdapterRef
    from wesam.adapters.ref import AdapterRef

    ref = AdapterRef.parse("polyp@v3")
    assert (ref.domain, ref.version, str(ref), ref.version_dir) == ("polyp", 3, "polyp@v3", "v3")
    assert AdapterRef.parse("polyp") == AdapterRef("polyp") and str(AdapterRef("polyp")) == "polyp"
    assert ref.at(4) == AdapterRef("polyp", 4) == AdapterRef.of("polyp", "v4") == AdapterRef.of("polyp", 4)
    assert parse_ref(ref) is ref and parse_ref("a-b_c@v12") == AdapterRef("a-b_c", 12)
    for bad in ("polyp@3", "polyp@v", "po lyp", "", "-x", "polyp@v1@v2", "x" * 65):
        with pytest.raises(InvalidAdapterRef):
            AdapterRef.parse(bad)
    for version in (0, -1, True, "3"):
        with pytest.raises(InvalidAdapterRef):
            AdapterRef("polyp", version)
    with pytest.raises(InvalidAdapterRef):
        AdapterRef("polyp").version_dir
    with pytest.raises(AdapterError):  # one base for callers that catch adapter problems
        AdapterRef.of("polyp", "vx")


def test_routing_is_read_through_adapter_ref(tmp_path: Path) -> None:
    from wesam.adapters.errors import InvalidAdapterRef

    reg = Registry(tmp_path)
    assert reg.path("polyp", 3) == tmp_path / "polyp" / "v3"
    for value, expected in (("v2", 2), ("2", 2)):
        (tmp_path / "routing.json").write_text(json.dumps({"polyp": value}))
        assert reg.active_version("polyp") == expected
    for bad in ("v0", "vx", "latest"):  # malformed routing is refused, never read as a version
        (tmp_path / "routing.json").write_text(json.dumps({"polyp": bad}))
        with pytest.raises(InvalidAdapterRef):
            reg.active_version("polyp")
