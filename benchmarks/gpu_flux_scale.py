"""Seconds per Calibri candidate image at FLUX.1-dev scale, all in, and the paper's projected cost.

Builds FLUX.1-dev's transformer (19 double + 38 single blocks, 12B parameters) and VAE at random init,
in bf16, allocated for real on the GPU, and runs the project's own sampling path
(:class:`DiffusersBackbone.generate`: ``make_velocity_fn`` + ``euler_sample``, VAE decode) on a bucket of
16 prompts at 512 px and 15 steps (the paper's calibration setting), then scores the images with a
reward model of realistic size: the project's :class:`PickScore` reward around a random-init CLIP
ViT-H/14 (632M-parameter vision tower + text tower; images go through PIL and the CLIP processor
exactly as with the released weights). Weights are random, so only the timing means anything.

Measured with and without calibration (per-sample coefficients through gate hooks, every coefficient
!= 1 so every hook runs), interleaved so drift hits both alike. Text encoders are not built: prompt
embeddings are computed once per prompt in a calibration, so random embeddings of T5-XXL / CLIP-L
shapes stand in for them. The projection is the paper's FLUX block calibration: 200 CMA-ES
generations x popsize(57 + 1) = 16 candidates x a bucket of 16 images.

    python benchmarks/gpu_flux_scale.py                      # CUDA; prints JSON (skipped without CUDA)
    python benchmarks/gpu_flux_scale.py --device cpu --tiny  # CPU smoke run of the same code, seconds

One GPU call stays under 8 minutes: ~1 min to build, warm-up at 2 steps, then ``--repeats`` rounds
of (baseline, calibrated); ``--budget-s`` stops adding rounds when the next would not fit.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PAPER_GENERATIONS = 200  # Flux block calibration (paper Table 5: 32 H100 GPU-hours)
PAPER_FLUX_BLOCK_GPU_HOURS = 32.0
FLUX_BLOCK_COEFFICIENTS = 57  # 19 double + 38 single blocks

# CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore's backbone)
CLIP_H14_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act="gelu",
)
CLIP_H14_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)
CLIP_TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=8,
    image_size=32,
    hidden_act="gelu",
)
CLIP_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (tiny smoke runs and 12B-parameter runs print in the same units)."""
    return float(f"{x:.{digits}g}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (CPU smoke run)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (32 with --tiny)")
    p.add_argument("--bucket", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of (baseline, calibrated)")
    p.add_argument("--granularity", default="gate", choices=["block", "layer", "gate"])
    p.add_argument("--budget-s", type=float, default=420.0, help="stop adding rounds after this many seconds")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    if args.steps < 1 or args.bucket < 1 or args.repeats < 1:
        p.error("--steps, --bucket and --repeats must be >= 1")
    return args


def build_reward(device: torch.device, dtype: torch.dtype, tiny: bool):
    """PickScore (this project's reward class) around a random-init CLIP ViT-H/14, processor built offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from calibri_pipeline.backbones.random_init import offline_tokenizer
    from calibri_pipeline.rewards.pickscore import PickScore

    vision, text = (CLIP_TINY_VISION, CLIP_TINY_TEXT) if tiny else (CLIP_H14_VISION, CLIP_H14_TEXT)
    tokenizer = offline_tokenizer(77)
    config = CLIPConfig(
        text_config={**text, "vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
        vision_config=vision,
        projection_dim=32 if tiny else 1024,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype directly, on the device
    try:
        with torch.device(device):
            model = CLIPModel(config)
    finally:
        torch.set_default_dtype(previous)
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    reward = PickScore(model, processor, device=device, dtype=dtype, batch_size=32)
    vision_params = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    return reward, vision_params, sum(p.numel() for p in model.parameters())


def linear_flops_per_image_step(backbone, prompt: str) -> float:
    """Multiply-add FLOPs of every nn.Linear in one transformer forward of one image (exact, via hooks),
    plus the attention matmuls (4 * tokens^2 * width per block)."""
    transformer = backbone.transformer
    total = [0.0]

    def hook(module, inputs, output):
        total[0] += 2.0 * inputs[0].numel() * module.out_features  # (rows x in) @ (in x out)

    handles = [m.register_forward_hook(hook) for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            cond = backbone.encode([prompt])
            noise = backbone.pack(backbone.initial_noise([0]).to(backbone.device))
            backbone.model_fn(
                noise,
                torch.ones(1, device=backbone.device),
                cond,
                guidance=backbone.default_guidance,
                resolution=backbone.resolution,
            )
    finally:
        for h in handles:
            h.remove()
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = backbone.image_seq_len() + cond["states"].shape[1]
    blocks = cfg.num_layers + cfg.num_single_layers
    return total[0] + blocks * 4.0 * tokens**2 * width


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        result = {
            "benchmark": "gpu_flux_scale",
            "skipped": True,
            "reason": "CUDA is not available on this machine; run on a GPU, or use --device cpu --tiny "
            "for a smoke run of the same code",
        }
        print(json.dumps(result, indent=2))
        return result
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the full FLUX.1-dev architecture (12B parameters) needs a GPU; use --tiny on the CPU")

    from calibri_pipeline.backbones.diffusers_dit import DiffusersBackbone, parse_dtype
    from calibri_pipeline.backbones.random_init import (
        FLUX_DEV_CLIP_DIM,
        FLUX_DEV_MAX_SEQUENCE_LENGTH,
        FLUX_DEV_T5_DIM,
        flux_dev_pipeline,
    )
    from calibri_pipeline.method.ensemble import EnsembleLayout
    from calibri_pipeline.method.search_config import default_popsize
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt

    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    resolution = args.resolution or (32 if args.tiny else 512)
    started = time.perf_counter()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    # ---- build: FLUX.1-dev transformer + VAE (random init, real allocation), reward model ----------
    pipe = flux_dev_pipeline(device, dtype, tiny=args.tiny)
    text_len = 16 if args.tiny else FLUX_DEV_MAX_SEQUENCE_LENGTH
    backbone = DiffusersBackbone.from_pipeline(
        pipe,
        name="flux-dev-random-init",
        resolution=resolution,
        default_max_batch=args.bucket,
        vae_batch=args.bucket,
        max_sequence_length=text_len,
    )
    text_dim = backbone.transformer.config.joint_attention_dim
    pooled_dim = backbone.transformer.config.pooled_projection_dim
    if not args.tiny:
        assert (text_dim, pooled_dim) == (FLUX_DEV_T5_DIM, FLUX_DEV_CLIP_DIM)
    prompts = [Prompt(f"benchmark prompt number {i}") for i in range(args.bucket)]
    gen = torch.Generator().manual_seed(1)
    for p in prompts:  # T5-XXL / CLIP-L shaped stand-ins (encoded once per prompt in a real calibration)
        backbone.cache_prompt_embeddings(
            p.text,
            {
                "states": torch.randn(1, text_len, text_dim, generator=gen).to(dtype),
                "pooled": torch.randn(1, pooled_dim, generator=gen).to(dtype),
            },
        )
    reward, reward_vision_params, reward_params = build_reward(device, dtype, args.tiny)
    build_s = time.perf_counter() - started

    space = CalibrationSpace.from_transformer(backbone.transformer, args.granularity)
    layout = EnsembleLayout(space.size, 1, cfg=False)
    vectors = layout.initial().repeat(args.bucket, 1)
    vectors[:, : space.size] += 0.2 * torch.randn(args.bucket, space.size, generator=gen, dtype=vectors.dtype)
    seeds = list(range(args.bucket))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(calibrated: bool, steps: int) -> tuple[float, float, int]:
        kw = {"space": space, "vectors": vectors} if calibrated else {}
        sync()
        t0 = time.perf_counter()
        images = backbone.generate(prompts, seeds, steps=steps, max_batch=args.bucket, **kw)  # CPU tensor: synced
        t1 = time.perf_counter()
        nonfinite = int((~torch.isfinite(images)).sum())
        # random weights can overflow bf16 somewhere; the reward must still see valid pixels
        scores = reward(torch.nan_to_num(images, nan=0.5).clamp(0, 1), prompts)
        sync()
        t2 = time.perf_counter()
        assert scores.shape == (args.bucket,)
        return t1 - t0, t2 - t1, nonfinite

    # ---- warm-up (kernels, allocator), then interleaved timed rounds ------------------------------
    warm_t0 = time.perf_counter()
    run(False, 2)
    run(True, 2)
    warmup_s = time.perf_counter() - warm_t0
    flops = linear_flops_per_image_step(backbone, prompts[0].text)

    times: dict[str, dict[str, list[float]]] = {v: {"generate": [], "reward": []} for v in ("baseline", "calibrated")}
    nonfinite_total = 0
    round_s = None
    for r in range(args.repeats):
        elapsed = time.perf_counter() - started
        if round_s is not None and elapsed + round_s > args.budget_s:
            break
        t_round = time.perf_counter()
        order = ("baseline", "calibrated") if r % 2 == 0 else ("calibrated", "baseline")
        for variant in order:
            gen_s, reward_s, nonfinite = run(variant == "calibrated", args.steps)
            times[variant]["generate"].append(gen_s)
            times[variant]["reward"].append(reward_s)
            nonfinite_total += nonfinite
        round_s = time.perf_counter() - t_round

    # VAE decode alone (part of "generate"), to split denoising from decoding
    latents = torch.randn(args.bucket, backbone.latent_channels(), *backbone.latent_size(), generator=gen).to(device)
    sync()
    t0 = time.perf_counter()
    backbone.decode_images(latents)
    sync()
    decode_s = time.perf_counter() - t0

    n = args.bucket
    per_image: dict[str, dict[str, float]] = {}
    for variant, t in times.items():
        gen_s = statistics.median(t["generate"])
        reward_s = statistics.median(t["reward"])
        denoise_s = max(gen_s - decode_s, 1e-9)
        per_image[variant] = {
            "denoise_s": sig(denoise_s / n),
            "vae_decode_s": sig(decode_s / n),
            "reward_s": sig(reward_s / n),
            "all_in_s": sig((gen_s + reward_s) / n),
            "denoise_tflops": sig(flops * n * args.steps / denoise_s / 1e12),
        }
    block_dim = FLUX_BLOCK_COEFFICIENTS + 1  # + the ensemble weight of one model
    popsize = default_popsize(block_dim)
    images_total = PAPER_GENERATIONS * popsize * n
    all_in = per_image["calibrated"]["all_in_s"]
    result = {
        "benchmark": "gpu_flux_scale",
        "skipped": False,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "tiny": args.tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "model": "FLUX.1-dev architecture, random init" if not args.tiny else "tiny FLUX (same classes)",
        "transformer_params_m": sig(sum(p.numel() for p in backbone.transformer.parameters()) / 1e6),
        "vae_params_m": sig(sum(p.numel() for p in backbone.vae.parameters()) / 1e6),
        "reward": "PickScore class, random-init CLIP ViT-H/14" if not args.tiny else "PickScore class, tiny CLIP",
        "reward_vision_params_m": sig(reward_vision_params / 1e6),
        "reward_params_m": sig(reward_params / 1e6),
        "resolution": resolution,
        "steps": args.steps,
        "bucket": n,
        "text_tokens": text_len,
        "image_tokens": backbone.image_seq_len(),
        "granularity": args.granularity,
        "coefficients": space.size,
        "rounds": len(times["baseline"]["generate"]),
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
        "gflop_per_image_step": sig(flops / 1e9),
        "per_image": per_image,
        "ratio_calibrated_all_in": sig(per_image["calibrated"]["all_in_s"] / per_image["baseline"]["all_in_s"]),
        "ratio_calibrated_denoise": sig(per_image["calibrated"]["denoise_s"] / per_image["baseline"]["denoise_s"]),
        "nonfinite_pixels": nonfinite_total,
        "projection": {
            "what": "paper's FLUX block calibration: generations x popsize(57+1) x bucket images, "
            "calibrated all-in seconds per image on this device",
            "generations": PAPER_GENERATIONS,
            "popsize": popsize,
            "images": images_total,
            "gpu_hours": sig(images_total * all_in / 3600.0),
            "paper_gpu_hours_h100": PAPER_FLUX_BLOCK_GPU_HOURS,
            "paper_s_per_image_h100": round(PAPER_FLUX_BLOCK_GPU_HOURS * 3600.0 / images_total, 3),
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    if not all(math.isfinite(v) for d in per_image.values() for v in d.values()):
        raise RuntimeError(f"non-finite timing: {per_image}")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
