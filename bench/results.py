"""Writing benchmark sections into bench/RESULTS.md between named markers."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """A one-line description of where a figure was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between <!-- BEGIN name --> and <!-- END name -->."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nEach section is written by the command named in it.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def report(section: str, markdown: str, result: dict[str, Any], json_path: str | Path | None,
           update_results: bool = True) -> None:
    """What a benchmark does with its figures: print the markdown, write the JSON (if a path is
    given) and, unless told not to, replace its section of bench/RESULTS.md."""
    print(markdown)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if update_results:
        write_section(section, markdown)
