"""Helpers shared by the export tests: running `wesam export` in-process, one torch thread, a sam-micro base file."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest
import torch

from wesam.export.cli import add_export_parser
from wesam.sam.zoo import resolve_model, save_safetensors


def wesam_export(*argv: str) -> tuple[int, str, str]:
    """Run ``wesam export ...`` in-process through ``add_export_parser``, as wesam/cli.py wires it."""
    parser = argparse.ArgumentParser(prog="wesam")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    args = parser.parse_args(["export", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch's threads spin-wait badly when the cores are busy; these models are tiny anyway."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_micro_base(work: Path) -> str:
    """sam-micro saved to a file so it has a SHA-256 like real base models."""
    m = resolve_model("sam-micro", seed=0)
    path = work / "micro.safetensors"
    save_safetensors(m.sam, path, name="sam-micro", config=m.config)
    return str(path)
