"""`wesam bench adapt-vitb`: the users' path on a ViT-B-layout model, on CPU, run once.

A checkpoint with random weights is generated in a temporary folder in the official file layout
(``sam_vit_b_01ec64.pth``: a plain ``torch.save``d state dict with the key names that
``segment_anything.build_sam_vit_b`` builds), and the real command line adapts it in a
subprocess: ``wesam adapt --model <file> --data DATA --prompt box --method wesam --steps N
--batch-size B --limit M --no-publish --threads T --grad-checkpointing on|off --json ...`` with
validation only where it cannot be avoided (before training, at the last step and after
selection; ``--limit`` keeps the carved validation part to one image). The model is named by its
file: ``--model vit_b --checkpoint FILE`` checks the published SHA-256, which generated weights
cannot have; from the file the architecture is inferred from its shapes (``vit_b``), and the
trainer runs exactly the same code as with the official weights: three 1024 px encoder passes per
image (anchor, teacher, student), LoRA on all 12 blocks, checkpointing of the passes with
gradient.

Reported: seconds per training step and the share of each phase (the run summary's ``speed``
block), wall time of the whole command, the subprocess's peak RSS (``wait4``'s ``ru_maxrss``),
the checkpointing setting, torch version, threads and machine. ``--compare-checkpointing`` runs
the command with checkpointing on and off. ``--max-memory-gb`` caps the subprocess's address
space (RLIMIT_AS; default: the memory available at start less 1 GiB), so a run that would not
fit fails with an allocation error instead of waking the kernel's OOM killer; the address space
is larger than the RSS (shared libraries, reservations), so the cap is conservative.

Usage:
    wesam bench adapt-vitb --threads 1                        # minutes per step on a CPU
    wesam bench adapt-vitb --steps 1 --compare-checkpointing  # memory with and without
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/data/kvasir_seg"
SECTION = "adapt-vitb"


def _mem_available() -> int | None:
    """Bytes of MemAvailable in /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def generate_checkpoint(model: str, folder: Path, seed: int = 0) -> tuple[Path, int, int]:
    """Random weights of zoo architecture ``model`` saved as the official checkpoint would be.

    Official models (vit_b/l/h) are built by ``segment_anything.sam_model_registry`` and written
    under their official file name; other zoo entries (``sam-micro``, for tests) by
    :func:`wesam.sam.zoo.build_sam`. Returns (path, bytes, image-encoder parameter count).
    """
    import torch

    from wesam.sam.zoo import ZOO, build_sam

    spec = ZOO.get(model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(ZOO)}")
    torch.manual_seed(seed)
    if spec.official_filename:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[spec.name](checkpoint=None)
        name = spec.official_filename
    else:
        sam = build_sam(spec.config)
        name = f"{spec.name}.pth"
    path = folder / name
    torch.save(sam.state_dict(), path)
    n_enc = sum(p.numel() for p in sam.image_encoder.parameters())
    return path, path.stat().st_size, n_enc


def run_adapt(args: argparse.Namespace, checkpoint: Path, mode: str, tmp: Path) -> dict[str, Any]:
    """One `wesam adapt` subprocess; its summary, wall time, peak RSS and exit status."""
    summary_path = tmp / f"summary-{mode}.json"
    cmd = [sys.executable, "-m", "wesam.cli", "adapt", "--model", str(checkpoint), "--data", args.data,
           "--domain", "bench-vitb", "--prompt", args.prompt, "--method", args.method, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--limit", str(args.limit), "--no-publish", "--no-resume",
           "--threads", str(args.threads), "--eval-every", str(args.steps + 1), "--grad-checkpointing", mode,
           "--registry", str(tmp / "registry"), "--work-dir", str(tmp / f"work-{mode}"), "--json", str(summary_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    limit = int(args.max_memory_gb * 2**30) if args.max_memory_gb else None
    print(f"[adapt-vitb] grad checkpointing {mode}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    # The child's log and progress go to our stderr: stdout carries only the report.
    try:
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (pytest): the process's fd 2
        err = 2
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=err)
    try:
        if limit:  # set at once, long before the model is loaded (no preexec_fn: this process has threads)
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    row: dict[str, Any] = {"grad_checkpointing": mode, "returncode": proc.returncode,
                           "wall_seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                           "address_space_limit_gb": args.max_memory_gb, "command": cmd}
    if proc.returncode != 0 or not summary_path.is_file():
        row["error"] = (f"wesam adapt exited with status {proc.returncode}"
                        + (f" under a {args.max_memory_gb:.1f} GiB address-space limit" if limit else ""))
        return row
    summary = json.loads(summary_path.read_text())
    speed = summary["speed"]
    row.update({
        "grad_checkpointing_on": summary.get("grad_checkpointing"),
        "steps": speed["steps"], "train_seconds": speed["train_seconds"],
        "seconds_per_step": round(speed["train_seconds"] / speed["steps"], 2) if speed["steps"] else None,
        "validation_seconds": speed["validation_seconds"], "share": speed["share"],
        "n_train": summary["n_train"], "n_val": summary["n_val"],
        "val_miou_before": (summary.get("val_before") or {}).get("miou"),
        "val_miou_after": (summary.get("val_after") or {}).get("miou"),
    })
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from wesam.bench.results import machine

    from wesam.sam.zoo import ZOO

    modes = ["on", "off"] if args.compare_checkpointing else [args.grad_checkpointing]
    with tempfile.TemporaryDirectory(prefix="wesam-adapt-vitb-", dir=args.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.monotonic()
        ckpt, size, n_enc = generate_checkpoint(args.model, tmp, args.seed)
        gen_s = time.monotonic() - t0
        print(f"[adapt-vitb] generated {ckpt.name} ({size / 2**20:.0f} MiB, random weights) in {gen_s:.1f} s",
              file=sys.stderr, flush=True)
        runs = [run_adapt(args, ckpt, mode, tmp) for mode in modes]
    cfg = ZOO[args.model].config
    return {
        "model": args.model, "img_size": cfg.img_size, "encoder_depth": cfg.encoder_depth,
        "encoder_parameters": n_enc, "checkpoint_file": ckpt.name, "checkpoint_mb": round(size / 2**20, 1),
        "data": args.data, "prompt": args.prompt, "method": args.method, "steps": args.steps,
        "batch_size": args.batch_size, "limit": args.limit, "threads": args.threads,
        "torch_version": torch.__version__, "machine": machine(), "note": args.note, "runs": runs,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def markdown(result: dict[str, Any]) -> str:
    r0 = next((r for r in result["runs"] if "n_val" in r), {})
    carved = f"{r0['n_val']} of them carved" if r0 else "a part carved"
    text = (
        f"`wesam bench adapt-vitb` on {result['machine']}: random weights in the official layout "
        f"(`{result['checkpoint_file']}`, {result['checkpoint_mb']:.0f} MiB, "
        f"{result['encoder_parameters'] / 1e6:.1f} M encoder parameters, {result['img_size']} px) adapted by the "
        f"real `wesam adapt` in a subprocess: method `{result['method']}`, `{result['prompt']}` prompts, "
        f"{result['steps']} step(s) of batch {result['batch_size']}, LoRA rank 4 on q,v of all "
        f"{result['encoder_depth']} blocks, the first {result['limit']} images of `{result['data']}` ({carved} for "
        f"validation, which runs before training, at the last step and after selection), "
        f"{result['threads']} torch thread(s). Seconds per step and the shares come from the run summary's `speed` "
        f"block (encoder backward includes the recomputation when checkpointing is on); wall time is the whole "
        f"command (loading, validations, training); peak RSS is the subprocess's `ru_maxrss`. The masks of random "
        f"weights mean nothing: only time and memory are measured here.")
    lines = [f"## Adaptation on a {result['model']}-layout model (CPU): the users' path", "", text]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", ("| grad checkpointing | s / step | encoder fwd | encoder bwd | decoder fwd | decoder bwd | rest "
                   "| validation s | wall s | peak RSS GiB |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['grad_checkpointing']} | failed: {r['error']} | | | | | | | {r['wall_seconds']:.0f} | "
                         f"{r['peak_rss_mb'] / 1024:.2f} |")
            continue
        sh = r["share"]
        lines.append(f"| {r['grad_checkpointing']} | {r['seconds_per_step']:.1f} | {_pct(sh['encoder_forward'])} | "
                     f"{_pct(sh['encoder_backward'])} | {_pct(sh['decoder_forward'])} | "
                     f"{_pct(sh['decoder_backward'])} | {_pct(sh['rest'])} | {r['validation_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r['peak_rss_mb'] / 1024:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench adapt-vitb", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"target-domain dataset folder (default {DEFAULT_DATA})")
    p.add_argument("--model", default="vit_b",
                   help="zoo architecture whose layout is generated (default vit_b; sam-micro for a smoke test)")
    p.add_argument("--prompt", default="box", choices=["box", "point", "coarse", "coarse-box"])
    p.add_argument("--method", default="wesam", help="adaptation method (default wesam: three encoder passes)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=8, help="images of the train split used (one is carved for validation)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the adaptation (default 2)")
    p.add_argument("--grad-checkpointing", default="on", choices=["auto", "on", "off"],
                   help="setting of the run without --compare-checkpointing (default on)")
    p.add_argument("--compare-checkpointing", action="store_true", help="run with checkpointing on, then off")
    p.add_argument("--max-memory-gb", type=float,
                   help="address-space cap of the subprocess in GiB (default: MemAvailable at start less 1 GiB; "
                        "0: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--tmp-dir", help="where the generated checkpoint goes (default: the system's temp folder)")
    p.add_argument("--note", default="", help="a sentence added to the RESULTS section (e.g. what else ran)")
    p.add_argument("--json", default="bench/adapt_vitb.json", help="write the results here")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.limit < 2 or args.threads < 1:
        p.error("need --steps, --batch-size, --threads >= 1 and --limit >= 2")
    if args.max_memory_gb is None:
        avail = _mem_available()
        args.max_memory_gb = round((avail - 2**30) / 2**30, 1) if avail else 0.0
    if not Path(args.data).is_dir():
        print(f"error: no dataset folder at {args.data} (give --data)", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from wesam.bench.results import report

    report(SECTION, markdown(result), result, args.json, update_results=not args.no_results)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
