"""Training and evaluation of the toy backbone, on tiny configs (the real run is far too long for tests)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from calibri_pipeline.backbones.toy import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, ToyModelConfig, load_toy_backbone
from calibri_pipeline.training.data import heldout_prompts, training_pool
from calibri_pipeline.training.toy_train import ToyTrainConfig, _lr_at, main, set_sampling_defaults, train_toy

TINY_MODEL = ToyModelConfig(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=16)


def tiny_config(**overrides) -> ToyTrainConfig:
    from calibri_pipeline.world import CATEGORIES

    base = dict(
        model=TINY_MODEL,
        steps=3,
        batch_size=4,
        warmup_steps=1,
        pool_per_category={c: 4 for c in CATEGORIES},
        eval_per_category=0,
        log_every=1,
        threads=None,
    )
    base.update(overrides)
    return ToyTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_run")
    metrics = train_toy(tiny_config(eval_per_category=1, eval_steps=2), out, progress=False)
    return out, metrics


def test_training_writes_checkpoint_config_and_metrics(trained):
    out, metrics = trained
    for name in (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE):
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp")), "temporary files left behind"
    assert metrics["steps"] == 3 and metrics["status"] == "steps"
    assert all(math.isfinite(p["loss"]) for p in metrics["loss_curve"]) and len(metrics["loss_curve"]) == 3
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["steps"] == 3 and saved["final_eval"]["rows"]
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["model"] == TINY_MODEL.to_dict()
    assert cfg["train"]["steps"] == 3 and cfg["train"]["caption_dropout"] > 0
    assert cfg["diffusers_config"]["num_layers"] == 1
    # the checkpoint loads as a backbone and generates
    backbone = load_toy_backbone(out)
    images = backbone.generate(["a red circle"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32)


def test_saved_weights_are_the_ema_not_the_raw_weights(trained):
    out, _ = trained
    state = load_file(str(out / WEIGHTS_FILE))
    # zero-initialised output projection: after 3 AdamW steps the raw weights moved by ~3 lr; the EMA
    # (warm-up decay (1+k)/(10+k)) moved by a fraction of that, but not by nothing
    moved = state["proj_out.weight"].abs().max().item()
    assert 0 < moved < 3 * 5e-4


def test_training_is_reproducible_with_a_seed(tmp_path):
    cfg = tiny_config(steps=2)
    train_toy(cfg, tmp_path / "a", progress=False)
    train_toy(cfg, tmp_path / "b", progress=False)
    train_toy(tiny_config(steps=2, seed=1), tmp_path / "c", progress=False)
    a, b, c = (load_file(str(tmp_path / d / WEIGHTS_FILE)) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_render_workers_give_the_same_batches_and_weights(tmp_path):
    """Batches are keyed by (seed, batch index), so rendering in worker processes changes nothing."""
    from calibri_pipeline.training.data import EncodedPool, WorldBatchStream

    pool = training_pool({"multi": 6, "counting": 6})
    prompts = pool["multi"] + pool["counting"]
    encoded = EncodedPool(
        prompts,
        {"multi": np.arange(6), "counting": np.arange(6, 12)},
        torch.randn(12, 4, 8).half(),
        torch.randn(12, 8).half(),
        torch.zeros(4, 8),
        torch.zeros(8),
    )
    inline = WorldBatchStream(encoded, {"multi": 1, "counting": 2}, 8, 0.3, seed=5)
    with WorldBatchStream(encoded, {"multi": 1, "counting": 2}, 8, 0.3, seed=5, workers=2) as parallel:
        pairs = [(inline.next(), parallel.next()) for _ in range(4)]
    for a, b in pairs:
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
    assert not torch.equal(pairs[0][0][0], pairs[1][0][0]), "consecutive batches must differ"
    with pytest.raises(ValueError, match="workers"):
        WorldBatchStream(encoded, {"multi": 1}, 8, 0.3, seed=5, workers=-1)

    train_toy(tiny_config(steps=2), tmp_path / "inline", progress=False)
    train_toy(tiny_config(steps=2, data_workers=2), tmp_path / "workers", progress=False)
    a, b = (load_file(str(tmp_path / d / WEIGHTS_FILE)) for d in ("inline", "workers"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_training_before_a_save(tmp_path):
    out = tmp_path / "nan"
    # Adam moves every weight by ~lr per step: at 1e30 the second forward overflows
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) at step [23]"):
        train_toy(tiny_config(steps=3, lr=1e30, warmup_steps=0), out, progress=False)
    assert not (out / WEIGHTS_FILE).exists(), "a diverged run must not leave weights behind"


def test_cuda_device_is_checked(tmp_path):
    with pytest.raises(ValueError, match="device"):
        tiny_config(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            train_toy(tiny_config(device="cuda"), tmp_path / "gpu", progress=False)
        assert not (tmp_path / "gpu").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert _lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert _lr_at(cfg, 9, 0.09) == pytest.approx(1e-3)
    assert _lr_at(cfg, 10, 0.1) < 1e-3
    assert _lr_at(cfg, 99, 1.0) == pytest.approx(1e-4)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        tiny_config(steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        tiny_config(caption_dropout=1.0)
    with pytest.raises(ValueError, match="t_sampling"):
        tiny_config(t_sampling="cosine")
    with pytest.raises(ValueError, match="unknown categories"):
        tiny_config(category_weights={"unicorns": 1.0})
    with pytest.raises(ValueError, match="unknown ToyTrainConfig keys"):
        ToyTrainConfig.from_dict({"stepz": 3})
    roundtrip = ToyTrainConfig.from_dict(tiny_config().to_dict())
    assert roundtrip == tiny_config()


def test_training_pool_is_disjoint_from_heldout_splits():
    pool = training_pool({"single": 300, "spatial": 300})
    held = {p.text for s in ("val", "test") for p in heldout_prompts(s, 100, categories=["single", "spatial"])}
    texts = {p.text for ps in pool.values() for p in ps}
    assert len(texts) == 600 and not texts & held
    # held-out prompts of one category equal that category's part of the full world split
    from calibri_pipeline.world import make_splits

    full = [p for p in make_splits(0, 0, 600, 1200)["test"] if p.category == "spatial"]
    assert {p.text for p in full} == {p.text for p in heldout_prompts("test", 200, categories=["spatial"])}
    with pytest.raises(ValueError, match="n_per_category"):
        heldout_prompts("test", 10_000)


def test_evaluate_toy_table(trained):
    from calibri_pipeline.training.evaluate_toy import evaluate_toy

    out, _ = trained
    backbone = load_toy_backbone(out)
    table = evaluate_toy(backbone, n_per_category=1, steps_list=(1, 2), guidance=2.0, categories=["single", "counting"])
    assert {(r.category, r.steps) for r in table.rows} == {
        (c, s) for c in ("single", "counting", "all") for s in (1, 2)
    }
    for r in table.rows:
        assert 0 <= r.accuracy <= 1 and 0 <= r.alignment <= 1 and 0 <= r.quality <= 1
    md = table.to_markdown()
    assert "| single | 1 |" in md and "2 steps" in md
    with pytest.raises(ValueError, match="steps_list"):
        evaluate_toy(backbone, 1, steps_list=(0,))


def test_cli_trains_and_sampling_defaults_can_be_recorded(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--double-blocks",
            "1",
            "--single-blocks",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--pool-per-category",
            "3",
            "--eval-per-category",
            "0",
            "--warmup-steps",
            "1",
            "--quiet",
            "--threads",
            "0",
        ]
    )
    assert rc == 0
    assert '"steps": 2' in capsys.readouterr().out
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["train"]["steps"] == 2 and cfg["train"]["pool_per_category"]["multi"] == 3
    set_sampling_defaults(out, steps=12, guidance=3.0, note="test")
    backbone = load_toy_backbone(out)
    assert backbone.default_steps == 12 and backbone.default_guidance == 3.0
    assert main(["--out", str(tmp_path / "bad"), "--steps", "0", "--quiet"]) == 2


def test_warm_start_continues_from_a_checkpoint(trained, tmp_path):
    src, _ = trained
    # a negligible learning rate: the warm-started run must end (almost) exactly where the source ended
    metrics = train_toy(tiny_config(steps=1, lr=1e-12, init_from=str(src)), tmp_path / "warm", progress=False)
    assert metrics["init_from"]["steps"] == 3 and metrics["total_steps"] == 4
    source = load_file(str(src / WEIGHTS_FILE))
    warm = load_file(str(tmp_path / "warm" / WEIGHTS_FILE))
    assert source["proj_out.weight"].abs().max() > 0  # not the zero init
    assert all(torch.allclose(warm[k], source[k], atol=1e-6) for k in source)
    other = ToyModelConfig(num_double_blocks=2, num_single_blocks=1, num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="same architecture"):
        train_toy(tiny_config(model=other, steps=1, init_from=str(src)), tmp_path / "bad", progress=False)
