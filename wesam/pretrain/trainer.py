"""`wesam pretrain`: train sam-mini from scratch with SAM-style interactive prompting.

Data: a seeded stream of procedural scenes mixed with the natural train splits
(coco128_seg, davis2016, camvid), multiplied by scale jitter, flips, photometric changes
and copy-paste of real instances. The data of step ``t`` depends only on (seed, t), so a
resumed run sees exactly what an uninterrupted one would.

Schedule: linear warm-up, then cosine decay over progress = max(step / steps,
elapsed / time budget), so a time-budgeted run still anneals before it stops.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wesam.evaluation.evaluate import PromptSpec, evaluate, inbox_logit_health
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.transforms import SamTransform
from wesam.sam.zoo import SAM_MINI, SamConfig, build_sam, load_checkpoint, resolve_model, save_safetensors

from .augment import compose_training_sample
from .prompting import (
    MODE_WEIGHTS,
    MODES,
    BoxPromptRecipe,
    box_regions,
    corrective_prompts,
    decode,
    initial_prompts,
    mask_losses,
)
from .regions import region_scene
from .sources import SOURCE_SETS, SourceImage, load_source
from .synthetic import SyntheticScenes, synthetic_validation_set


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain-sam-mini"
    data_root: str | None = "../shared/data"
    seed: int = 0
    steps: int | None = None
    time_budget_min: float | None = 100.0
    batch_size: int = 8
    max_prompts: int = 8
    lr: float = 4e-4
    min_lr_frac: float = 0.02
    weight_decay: float = 0.05
    warmup_steps: int = 250
    grad_clip: float = 1.0
    synth_prob: float = 0.35
    # Share of region scenes (natural textures in random smooth shapes, pretrain/regions.py),
    # drawn from what synth_prob leaves; the rest are natural images.
    region_prob: float = 0.0
    source_weights: dict[str, float] = field(
        default_factory=lambda: {"coco128_seg": 0.45, "davis2016": 0.2, "camvid": 0.35})
    paste_prob: float = 0.5
    refine_prob: float = 0.35
    loss_resolution: int = 128  # losses on logits upsampled to this size (input frame is 256)
    # Box prompts: share of exact boxes, and the noise of the others (input-frame pixels).
    # The shipped v1 run used no exact boxes and std 0.1 capped at 20 px.
    tight_box_frac: float = 0.5
    box_jitter_std: float = 0.05
    box_jitter_max_px: float = 5.0
    # Balanced object/background BCE inside box prompts. Off by default: with it, a warm restart
    # (run v2a, lr 2e-4) lost 6 validation points in 20 minutes and pulled in-box logits to 0.
    inbox_weight: float = 0.0
    things_only: bool = True  # drop semantic stuff classes (CamVid road, sky, ...) from training
    init_from: str | None = None  # warm start: weights file of the same architecture
    eval_every_min: float = 10.0
    ckpt_every_min: float = 3.0
    n_synth_val: int = 100
    threads: int | None = None
    # Where the model trains ("cpu", "cuda", "cuda:1"). The data pipeline (augmentation, prompt
    # sampling) stays on the CPU; only the network and its losses move.
    device: str = "cpu"
    model_config: SamConfig = SAM_MINI

    def schedule_progress(self, step: int, elapsed_s: float) -> float:
        p = 0.0
        if self.steps:
            p = max(p, step / self.steps)
        if self.time_budget_min:
            p = max(p, elapsed_s / (60 * self.time_budget_min))
        return min(p, 1.0)

    def done(self, step: int, elapsed_s: float) -> bool:
        if not self.steps and not self.time_budget_min:
            raise ValueError("set --steps or --time-budget")
        return self.schedule_progress(step, elapsed_s) >= 1.0

    def lr_at(self, step: int, elapsed_s: float) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        p = self.schedule_progress(step, elapsed_s)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class DataMixture:
    """Draws training samples (image <= 256 px longest side, (N, h, w) masks) for a step."""

    def __init__(self, cfg: PretrainConfig, sources: dict[str, list[SourceImage]]) -> None:
        self.cfg = cfg
        self.sources = {k: v for k, v in sources.items() if v}
        self.synth = SyntheticScenes(seed=cfg.seed + 1000, size=cfg.model_config.img_size)
        names = list(self.sources)
        w = np.array([cfg.source_weights.get(n, 0.0) for n in names], dtype=np.float64)
        self.names = names
        self.weights = w / w.sum() if w.sum() > 0 else w
        self.paste_pool = [s for n in names for s in self.sources[n]]
        self.region_pool = [s.image for s in self.paste_pool]

    def _paste_source(self, rng: np.random.Generator) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def draw() -> tuple[np.ndarray, np.ndarray]:
            s = self.paste_pool[int(rng.integers(len(self.paste_pool)))]
            return s.image, s.instances
        return draw

    def sample(self, step: int, j: int) -> tuple[np.ndarray, np.ndarray, str]:
        rng = np.random.default_rng([self.cfg.seed, step, j])
        size = self.cfg.model_config.img_size
        u = rng.random()
        if not self.names or u < self.cfg.synth_prob:
            image, masks = self.synth.sample(step * self.cfg.batch_size + j)
            source = "synthetic"
        elif u < self.cfg.synth_prob + self.cfg.region_prob:
            image, masks = region_scene(rng, self.region_pool, size)
            source = "regions"
        else:
            source = self.names[int(rng.choice(len(self.names), p=self.weights))]
            pool = self.sources[source]
            s = pool[int(rng.integers(len(pool)))]
            image, masks = s.image, s.instances
        paste = self._paste_source(rng) if self.paste_pool and rng.random() < self.cfg.paste_prob else None
        image, masks = compose_training_sample(image, masks, rng, out_size=size, paste_source=paste)
        return image, masks, source


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns the previous handler
    (None when not on the main thread, where signal handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def _training_device(name: str) -> torch.device:
    """The device to train on, refused with a clear message when this machine lacks it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch sees no CUDA device here "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: use cpu or cuda[:N]")
    return device


def _machine() -> str:
    return f"{platform.node()} {platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _training_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.sam = build_sam(cfg.model_config)
        if cfg.init_from:
            self._warm_start(cfg.init_from)
        self.sam.to(self.device).train()
        self.box_recipe = BoxPromptRecipe(cfg.tight_box_frac, cfg.box_jitter_std, cfg.box_jitter_max_px)
        self.transform = SamTransform(cfg.model_config.img_size, cfg.model_config.low_res_size)
        self.opt = torch.optim.AdamW(self.sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.elapsed = 0.0
        self.best_score = -1.0
        self.history: list[dict[str, Any]] = []
        self._load_data()

    def _warm_start(self, ref: str) -> None:
        """Copy every tensor of ``ref`` whose name and shape this architecture shares.

        Same architecture: an exact copy. Another width of the prompt encoder and mask decoder
        (``--decoder-dim``): the image encoder's trunk is copied and the rest starts fresh.
        """
        loaded = resolve_model(ref)
        own = self.sam.state_dict()
        shared = {k: v for k, v in loaded.sam.state_dict().items() if k in own and own[k].shape == v.shape}
        trunk = [k for k in own if k.startswith("image_encoder.blocks.")]
        if not trunk or not all(k in shared for k in trunk):
            raise ValueError(f"--init-from {ref}: its architecture ({loaded.config.to_json()}) shares no image "
                             f"encoder with the one being trained ({self.cfg.model_config.to_json()})")
        self.sam.load_state_dict(shared, strict=False)
        fresh = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in own if k not in shared})
        self.log(f"warm start from {ref}: {len(shared)}/{len(own)} tensors copied"
                 + (f"; fresh: {', '.join(fresh)}" if fresh else ""))

    # -- data
    def _load_data(self) -> None:
        root = Path(self.cfg.data_root) if self.cfg.data_root else None
        train: dict[str, list[SourceImage]] = {}
        self.val: dict[str, list[SourceImage]] = {}
        if root is not None:
            for name in SOURCE_SETS:
                if not (root / name).is_dir():
                    self.log(f"warning: {root / name} not found; skipping")
                    continue
                train[name] = load_source(root, name, "train", things_only=self.cfg.things_only)
                self.val[name] = load_source(root, name, "val", things_only=self.cfg.things_only)
                self.log(f"source {name}: {len(train[name])} train / {len(self.val[name])} val images")
        self.mixture = DataMixture(self.cfg, train)
        sv = synthetic_validation_set(n=self.cfg.n_synth_val, size=self.cfg.model_config.img_size)
        self.synth_val = [SourceImage(f"synval{i:04d}", im, m) for i, (im, m) in enumerate(sv)]

    # -- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "model": self.sam.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "best_score": self.best_score,
            "history": json.dumps(self.history),
            "config": json.dumps(_config_json(self.cfg)),
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt_path)

    def resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        saved_cfg = json.loads(state["config"])
        if saved_cfg.get("model_config") != _config_json(self.cfg)["model_config"]:
            raise RuntimeError(f"{self.ckpt_path} was trained with another architecture; use a new --out")
        self.sam.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.best_score = float(state["best_score"])
        self.history = json.loads(state["history"])
        self.log(f"resumed from {self.ckpt_path}: step {self.step}, {self.elapsed / 60:.1f} min trained")
        return True

    # -- one optimisation step
    def train_step(self) -> dict[str, float]:
        cfg, sam = self.cfg, self.sam
        size = cfg.model_config.img_size
        batch = [self.mixture.sample(self.step, j) for j in range(cfg.batch_size)]
        rng = np.random.default_rng([cfg.seed, self.step, 10_000])
        images = torch.stack([self.transform.image_to_tensor(im)[0] for im, _, _ in batch]).to(self.device)
        feats = sam.image_encoder(images)
        total = torch.zeros((), device=self.device)
        for i, (im, masks, _) in enumerate(batch):
            if len(masks) > cfg.max_prompts:
                masks = masks[rng.choice(len(masks), cfg.max_prompts, replace=False)]
            h, w = masks.shape[1:]
            gts = torch.zeros((len(masks), 1, size, size))
            gts[:, 0, :h, :w] = torch.as_tensor(masks, dtype=torch.float32)
            res = cfg.loss_resolution
            gts = F.interpolate(gts, (res, res), mode="area")[:, 0] if res != size else gts[:, 0]
            gts = gts.to(self.device)
            mode = MODES[int(rng.choice(len(MODES), p=MODE_WEIGHTS))]
            prompts = initial_prompts(masks, mode, rng, self.transform, feats.device, self.box_recipe)
            inbox = box_regions(prompts.boxes, res, size / res) if prompts.boxes is not None else None
            low_res, iou_pred = decode(sam, feats[i: i + 1], prompts)
            loss, best, up = mask_losses(low_res, iou_pred, gts, inbox, cfg.inbox_weight)
            if mode != "coarse" and rng.random() < cfg.refine_prob:
                rows = torch.arange(len(best))
                prev = low_res[rows, best][:, None].detach()
                prompts = corrective_prompts(prompts, (up > 0).detach(), gts > 0.5, prev, rng, scale=size / res)
                low_res, iou_pred = decode(sam, feats[i: i + 1], prompts)
                loss2, _, _ = mask_losses(low_res, iou_pred, gts, inbox, cfg.inbox_weight)
                loss = 0.5 * (loss + loss2)
            total = total + loss
        total = total / cfg.batch_size
        lr = cfg.lr_at(self.step, self.elapsed)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return {"loss": total.item(), "lr": lr}

    # -- validation
    def validate(self) -> dict[str, Any]:
        self.sam.eval()
        pred = SamPredictorCore(self.sam, device=self.device)  # (the default would move it to the CPU)
        res: dict[str, Any] = {"step": self.step, "minutes": round(self.elapsed / 60, 2)}
        res["synthetic_box"] = evaluate(pred, self.synth_val, PromptSpec("box"))["miou"]
        res["synthetic_click"] = evaluate(pred, self.synth_val, PromptSpec("point", n_points=(1, 0)))["miou"]
        for name, samples in self.val.items():
            res[f"{name}_val_box"] = evaluate(pred, samples, PromptSpec("box"))["miou"]
        # Health: does the model separate the object from the rest of its box? (medians over
        # the natural validation parts, else the synthetic ones; v1 ended near +0.5 / -0.4)
        natural_val = [smp for v in self.val.values() for smp in v]
        res.update(inbox_logit_health(pred, natural_val or self.synth_val))
        natural = [res[f"{n}_val_box"] for n in self.val]
        # Natural-image box quality is what the target domains need; synthetic keeps clicks honest.
        res["score"] = float(np.mean(natural + [res["synthetic_box"], res["synthetic_click"]]))
        self.sam.train()
        return res

    def _export_best(self, res: dict[str, Any]) -> None:
        save_safetensors(self.sam, self.out / "best.safetensors", name="sam-mini", config=self.cfg.model_config)
        (self.out / "best.json").write_text(json.dumps(res, indent=2))

    # -- main loop
    def run(self, resume: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        if resume:
            self.resume()
        cfg = self.cfg
        if self.step == 0 and cfg.init_from and not self.history:
            # The warm start's own point on the learning curve; before the clock starts, so that
            # validation time is not counted as training time.
            self._validate_and_keep(None)
        total = cfg.steps or None
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, mininterval=5)
        last_ckpt = time.monotonic()
        # Validations sit on a grid of training minutes (10, 20, ...), also across resumes, so
        # that learning curves of runs compare at equal training time.
        last_minutes = self.history[-1]["minutes"] if self.history else 0.0
        next_eval_min = (math.floor(last_minutes / cfg.eval_every_min + 1e-9) + 1) * cfg.eval_every_min
        t0 = time.monotonic() - self.elapsed
        ema = None
        # `kill` (SIGTERM, also what Kubernetes sends) stops like Ctrl-C: checkpoint, then exit.
        # SIGINT alone would not do: shells start background jobs (`nohup ... &`) with it ignored.
        previous = _sigterm_as_interrupt()
        try:
            while not cfg.done(self.step, self.elapsed):
                stats = self.train_step()
                self.elapsed = time.monotonic() - t0
                ema = stats["loss"] if ema is None else 0.98 * ema + 0.02 * stats["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{stats['lr']:.1e}",
                                img_s=f"{self.step * cfg.batch_size / max(self.elapsed, 1e-6):.1f}",
                                min=f"{self.elapsed / 60:.1f}")
                now = time.monotonic()
                if self.elapsed >= 60 * next_eval_min:
                    self._validate_and_keep(ema)
                    next_eval_min += cfg.eval_every_min
                    t0 += time.monotonic() - now  # validation time is not training time
                if now - last_ckpt > 60 * cfg.ckpt_every_min:
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            bar.close()
            self.save_checkpoint()
        final = self._validate_and_keep(ema)
        self.save_checkpoint()
        return {"final": final, "best_score": self.best_score, "steps": self.step,
                "minutes": self.elapsed / 60}

    def _validate_and_keep(self, train_loss: float | None) -> dict[str, Any]:
        res = self.validate()
        res["train_loss"] = train_loss
        self.history.append(res)
        # The learning curve as it grows, readable without torch (wesam bench pretrain-curve).
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")
        if res["score"] > self.best_score:
            self.best_score = res["score"]
            self._export_best(res)
            res["best"] = True
        self.log("validation: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
        return res


def _config_json(cfg: PretrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["model_config"] = cfg.model_config.to_json()
    return d


# PretrainConfig field -> `wesam pretrain` flag, for the recipe fields a run may change.
RECIPE_FLAGS = {
    "time_budget_min": "--time-budget", "seed": "--seed", "threads": "--threads", "lr": "--lr",
    "batch_size": "--batch-size", "max_prompts": "--max-prompts", "warmup_steps": "--warmup-steps",
    "tight_box_frac": "--tight-box-frac", "box_jitter_std": "--box-jitter-std",
    "box_jitter_max_px": "--box-jitter-max-px", "inbox_weight": "--inbox-weight", "init_from": "--init-from",
    "synth_prob": "--synthetic-prob", "region_prob": "--region-prob", "device": "--device",
}


def sam_mini_config(decoder_dim: int = SAM_MINI.prompt_embed_dim) -> SamConfig:
    """sam-mini with another prompt-encoder / mask-decoder width (MLP and IoU head scaled alike).

    SAM's decoder repeats the image tokens for every prompt, so at 256 px its width, not the
    encoder, sets the cost of a training step.
    """
    if decoder_dim == SAM_MINI.prompt_embed_dim:
        return SAM_MINI
    if decoder_dim % SAM_MINI.decoder_num_heads or decoder_dim < 32:
        raise ValueError(f"decoder width {decoder_dim}: use a multiple of {SAM_MINI.decoder_num_heads}, at least 32")
    return replace(SAM_MINI, prompt_embed_dim=decoder_dim, decoder_mlp_dim=8 * decoder_dim,
                   iou_head_hidden_dim=decoder_dim)


def reproduce_command(cfg: dict[str, Any]) -> str:
    """The `wesam pretrain` command line that trains with the recipe ``cfg`` (a config JSON)."""
    defaults = _config_json(PretrainConfig())
    parts = ["wesam pretrain --data-root ../shared/data", f"--out {cfg.get('out_dir', 'runs/pretrain-sam-mini')}"]
    width = (cfg.get("model_config") or {}).get("prompt_embed_dim", SAM_MINI.prompt_embed_dim)
    if width != SAM_MINI.prompt_embed_dim:
        parts.append(f"--decoder-dim {width}")
    for key, flag in RECIPE_FLAGS.items():
        value = cfg.get(key)
        if value is not None and (value != defaults.get(key) or key in ("time_budget_min", "seed")):
            parts.append(f"{flag} {value}")
    if not cfg.get("things_only", True):
        parts.append("--with-stuff")
    return " ".join(parts) + " --ship models/sam-mini"


def ship(run_dir: str | Path, dest_dir: str | Path, *, machine: str | None = None) -> dict[str, Any]:
    """Write the best checkpoint of a run as fp16 safetensors + manifest into ``dest_dir``."""
    run_dir, dest_dir = Path(run_dir), Path(dest_dir)
    best = load_checkpoint(run_dir / "best.safetensors")
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = json.loads(state["config"])
    history = json.loads(state["history"])
    weights = dest_dir / "sam-mini.safetensors"
    digest = save_safetensors(best.sam, weights, name="sam-mini", config=best.config, dtype=torch.float16)
    manifest = {
        "name": "sam-mini",
        "file": weights.name,
        "sha256": digest,
        "dtype": "float16",
        "bytes": weights.stat().st_size,
        "architecture": best.config.to_json(),
        "training": {
            "command": reproduce_command(cfg),
            "recipe": {k: v for k, v in cfg.items() if k not in ("out_dir", "data_root", "model_config")},
            "data": {"synthetic": "procedural scenes (adapters/pretrain/synthetic.py), seed-derived stream",
                     "natural_train_splits": list(SOURCE_SETS),
                     "never_seen": ["kvasir_seg", "cvc_clinicdb", "all test splits"]},
            "steps": int(state["step"]),
            "wall_minutes": round(float(state["elapsed"]) / 60, 1),
            "machine": machine or (f"{_machine()}; training used {cfg.get('threads') or 'all'} thread(s)"
                                   + (f" and {cfg['device']}" if cfg.get("device", "cpu") != "cpu" else "")),
        },
        "selected": json.loads((run_dir / "best.json").read_text()),
        "validation_history": history,
    }
    (dest_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
