"""``wesam serve`` argument handling and ``wesam bench serve`` on sam-micro (it starts its own server)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wesam.service.cli import add_serve_parser, check_model, config_from_args, serve_command
from wesam.service.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wesam")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_flags_override_environment_and_paths_become_absolute(tmp_path: Path) -> None:
    env = {"WESAM_SERVE_WORKERS": "3", "WESAM_SERVE_CACHE_MB": "10", "WESAM_SERVE_ADMIN_TOKEN": "from-env"}
    args = _parse("--registry", "reg", "--workers", "2", "--merged", "polyp", "skin", "--runtime", "onnx",
                  "--host", "0.0.0.0")
    config = config_from_args(args, env)
    assert config.workers == 2 and config.cache_mb == 10 and config.admin_token == "from-env"
    assert config.max_queue == 32 and not config.single_process
    assert config_from_args(_parse("--max-queue", "4"), {"WESAM_SERVE_MAX_QUEUE": "9"}).max_queue == 4
    assert config_from_args(_parse(), {"WESAM_SERVE_MAX_QUEUE": "9"}).max_queue == 9
    assert config_from_args(_parse(), {}).single_process  # one worker: the worker holds the model
    with pytest.raises(ConfigError, match="MAX_QUEUE"):
        config_from_args(_parse("--max-queue", "0"), {})
    assert config.registry == str(Path("reg").resolve()) and config.merged_domains == ("polyp", "skin")
    assert config.runtime == "onnx" and config.grpc_port == 8001 and config.grpc_host == "0.0.0.0"
    assert config_from_args(_parse("--no-grpc"), env).grpc_port is None
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert config_from_args(_parse("--admin-token-file", str(token)), {}).admin_token == "s3cret"
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(_parse("--admin-token-file", str(tmp_path / "missing")), {})
    cmd, child_env = serve_command(config, "127.0.0.1", 3100)
    assert cmd[1:4] == ["-m", "bentoml", "serve"] and "wesam.service.service:Segmenter" in cmd
    assert child_env["WESAM_SERVE_WORKERS"] == "2" and child_env["WESAM_SERVE_RUNTIME"] == "onnx"
    assert child_env["BENTOML_DO_NOT_TRACK"] == "True"


def test_missing_weights_fail_before_starting(tmp_path: Path) -> None:
    from wesam.sam.zoo import ModelLoadError

    with pytest.raises(ModelLoadError, match="not an existing file"):
        check_model(config_from_args(_parse("--model", str(tmp_path / "nope.safetensors")), {}))
    with pytest.raises(ModelLoadError, match="official checkpoint"):
        check_model(config_from_args(_parse("--model", "vit_b"), {}))
    check_model(config_from_args(_parse("--model", "sam-micro"), {}))
    r = subprocess.run([sys.executable, "-m", "wesam.service.cli", "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr
    r = subprocess.run([sys.executable, "-m", "wesam.service.cli", "serve", "--model", "sam-micro", "--port", "8001"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--grpc-port and --port must differ" in r.stderr


def test_bench_serve_runs_on_sam_micro(tmp_path: Path) -> None:
    from service_support import make_base

    from wesam.bench import serve

    base = make_base(tmp_path)
    out = tmp_path / "bench.json"
    code = serve.main(["--model", str(base), "--requests", "3", "--warmup", "1", "--concurrency", "2",
                       "--threads", "1", "--image-size", "40x56", "--json", str(out), "--no-results"])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("in_process", "service_full", "service_cached", "grpc_full", "throughput_1_client",
                "throughput_2_clients"):
        assert result[key]["requests"] >= 1 and result[key]["p50_ms"] > 0 and result[key]["p95_ms"] > 0
    assert result["overhead_ratio"] > 0 and result["cached_speedup"] > 0 and result["concurrency_speedup"] > 0
    assert result["grpc_overhead_ratio"] > 0 and result["throughput_vs_in_process"] > 0
    assert result["model"] == "sam-micro" and result["image_size"] == [40, 56]
    md = serve.markdown(result, 2)
    assert "| service `/segment`, cached `image_id`, 1 box |" in md and "overhead" in md and "(gRPC: x" in md
    assert "| gRPC `ModelInfer`, new image (file as BYTES), 1 box |" in md
    # capture off and on, side by side; the capturing server stored every measured request
    cap = result["capture"]
    assert cap["off"]["requests"] == cap["on"]["requests"] == 3 and cap["p50_ratio"] > 0
    assert cap["store_stats"]["samples"] == {"base": 4}  # 3 measured + 1 warm-up: every request stored
    assert "capture on (every request stored" in md and "Capture on / off (p50)" in md


def test_bench_load_runs_on_sam_micro(tmp_path: Path) -> None:
    from service_support import make_base, publish_adapter

    from wesam.bench import load
    from wesam.bench.results import write_section

    base = make_base(tmp_path)
    publish_adapter(base, tmp_path / "registry", "polyp", seed=1)
    out = tmp_path / "load.json"
    code = load.main(["--model", str(base), "--registry", str(tmp_path / "registry"), "--domains", "base,polyp",
                      "--clients", "1,3", "--duration", "2", "--soak-requests", "60", "--soak-clients", "3",
                      "--images", "12", "--cached-images", "4", "--cache-entries", "8", "--image-size", "40x56",
                      "--threads", "1", "--rss-interval", "0.1", "--warmup", "4", "--json", str(out), "--no-results"])
    assert code == 0
    result = json.loads(out.read_text())
    assert [p["clients"] for p in result["phases"]] == [1, 3] and result["domains"] == ["base", "polyp"]
    for phase in (*result["phases"], result["soak"]):
        assert phase["ok"] >= 1 and phase["p50_ms"] > 0 and phase["p99_ms"] >= phase["p50_ms"]
        assert phase["non_200"] == 0 and phase["answers"] == {"200 ok": phase["requests"]}  # nothing overloads here
        assert phase["by_kind"]["new"]["ok"] >= 1 or phase["by_kind"]["cached"]["ok"] >= 1
    soak = result["soak"]
    assert soak["requests"] == 60 and soak["rss"]["samples"] >= 2 and soak["rss"]["first_tenth_mib"] > 0
    assert soak["rss"]["growth_pct"] is not None and any(n.startswith("Segmenter") for n in soak["rss"]["per_process"])
    md = load.markdown(result)
    assert "| clients | requests | 200 |" in md and "Server RSS" in md
    # the RESULTS.md section writer, on a copy (the committed figures come from the lead's quiet machine)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- BEGIN serve -->\nx\n<!-- END serve -->\n")
    write_section("load", md, path=results)
    write_section("load", md, path=results)  # replaced, not appended twice
    text = results.read_text()
    assert text.count("<!-- BEGIN load -->") == 1 and "<!-- BEGIN serve -->\nx\n" in text and md in text
