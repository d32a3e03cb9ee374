"""Population evaluation on a local Ray cluster: the same scores as in-process evaluation, workers
killed mid-chunk or between generations are replaced and the calibration ends where an in-process
one ends.

One module-scoped cluster (3 logical CPUs and 3 logical GPUs, token auth with a random token,
session files in a pytest temp dir) and one 2-worker evaluator shared by the tests; the model
is a tiny random-init toy DiT saved as a real toy checkpoint, loaded on the CPU in every worker by
``load_toy_backbone``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from calibri_pipeline.method.calibrate import CalibrationOptions, calibrate  # noqa: E402
from calibri_pipeline.method.ensemble import EnsembleLayout  # noqa: E402
from calibri_pipeline.method.population import evaluate_population  # noqa: E402
from calibri_pipeline.method.ray_eval import RayWorkerPool, connect_ray  # noqa: E402
from calibri_pipeline.method.sampler import SamplingSettings  # noqa: E402
from calibri_pipeline.method.search_config import SearchConfig  # noqa: E402
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace  # noqa: E402
from calibri_pipeline.prompts.base import Prompt  # noqa: E402
from calibri_pipeline.rewards.base import RewardError  # noqa: E402

#: images are quantised to 8 bits before they are scored, so a ~1e-7 difference between batch
#: compositions (other kernels) can flip one pixel's rounding: 1/255 over an 8x8 image moves a
#: mean-abs score by ~2e-5. Comparisons across batch shapes allow a few such steps.
SCORE_ATOL = 1e-4

WORDS = ["red", "green", "blue", "yellow", "cube", "ball", "star", "ring", "small", "big"]
GUIDANCE = 2.5


class ColourMatch:
    """Exact reward: 1 - mean |image - a colour picked by the prompt's hash| (higher is better)."""

    name = "colour_match"
    higher_is_better = True
    scale = (0.0, 1.0)

    def __call__(self, images, prompts):
        targets = torch.stack(
            [
                torch.tensor(list(hashlib.sha1(p.text.encode()).digest()[:3]), dtype=torch.float32) / 255.0
                for p in prompts
            ]
        )[:, :, None, None]
        return 1.0 - (images - targets).abs().mean(dim=(1, 2, 3))


class Brightness:
    name = "brightness"
    higher_is_better = True
    scale = (0.0, 1.0)

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class BlockFirstCaller(ColourMatch):
    """ColourMatch whose first caller (across processes) records its pid and then hangs, so the test
    can kill exactly that worker in the middle of its chunk."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, images, prompts):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().__call__(images, prompts)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(120)  # killed long before this ends
        raise AssertionError("the blocked worker was not killed")


class NanReward(ColourMatch):
    name = "nan_reward"

    def __call__(self, images, prompts):
        scores = super().__call__(images, prompts)
        scores[0] = float("nan")
        return scores


def remote(pool, backbone, space, vectors, prompts, seeds, reward, *, steps=None, guidance=None, n_models=1):
    """``evaluate_population``'s answer, computed on the pool's workers."""
    from calibri_pipeline.method.population import as_reward_list
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.space import SearchSpace

    search = None if space is None else SearchSpace.for_model(space, n_models, uses_cfg=True)
    scores = pool.evaluator(backbone, search, reward, SamplingSettings(steps=steps, guidance=guidance))(
        vectors, prompts, seeds
    ).scores
    out = {name: torch.from_numpy(v).to(torch.float32) for name, v in scores.items()}
    return out if isinstance(reward, (list, tuple)) else out[as_reward_list(reward)[0].name]


def make_prompts(n: int, split: str, offset: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(offset)
    return [Prompt(" ".join(rng.choice(WORDS, size=3)) + f" #{offset + i}", split=split) for i in range(n)]


def random_vectors(space: CalibrationSpace, n_models: int, p: int, seed: int = 0) -> torch.Tensor:
    x0 = EnsembleLayout(space.size, n_models, cfg=True).initial(GUIDANCE if n_models > 1 else None)
    g = torch.Generator().manual_seed(seed)
    return (x0 + 0.3 * torch.randn(p, x0.numel(), generator=g, dtype=torch.float64)).to(torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-init toy DiT written as a toy checkpoint directory (config.json + safetensors)."""
    from safetensors.torch import save_file

    from tiny_models import tiny_toy_transformer

    config, transformer = tiny_toy_transformer(2, gain=3.0)
    path = tmp_path_factory.mktemp("tiny_toy")
    (path / "config.json").write_text(
        json.dumps(
            {
                "model": config.to_dict(),
                "sampling": {"default_steps": 2, "default_guidance": GUIDANCE},
            }
        )
    )
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def factory(checkpoint):
    from calibri_pipeline.backbones.toy import load_toy_backbone

    return functools.partial(load_toy_backbone, str(checkpoint))


@pytest.fixture(scope="module")
def backbone(factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split across threads
    yield factory()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    ray_home = Path.home() / ".ray"
    existed = ray_home.exists()
    temp_dir = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")}
    # the workers unpickle this module's reward classes: they must be able to import it
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        os.environ.pop(k, None)
    assert not ray.is_initialized()
    # 3 logical GPUs (none need exist): the evaluator must give each actor one of its own. The test
    # model is built on the CPU regardless, so this also runs on a machine with a real GPU.
    assert connect_ray("local", num_cpus=3, num_gpus=3, temp_dir=str(temp_dir)) is True
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Ray wrote its session inside the temp dir and no token file into the home directory
    assert any(temp_dir.iterdir())
    assert existed or not ray_home.exists()


@pytest.fixture(scope="module")
def evaluator(cluster, factory):
    with RayWorkerPool(factory, n_workers=2, threads_per_worker=1) as ev:
        yield ev


def test_ray_scores_equal_in_process_scores(evaluator, backbone):
    assert len({info["pid"] for info in evaluator.worker_info}) == 2
    assert all(info["threads"] == 1 and info["device"] == "cpu" for info in evaluator.worker_info)
    # the cluster has GPUs, so each replica was given exactly one, and not the same one
    assert evaluator.gpus_per_worker == 1.0
    gpu_ids = [info["gpu_ids"] for info in evaluator.worker_info]
    assert all(len(ids) == 1 for ids in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    prompts, seeds = make_prompts(3, "train"), [11, 12, 13]
    for granularity, n_models in (("block", 1), ("gate", 2)):
        space = CalibrationSpace.from_transformer(backbone.transformer, granularity)
        vectors = random_vectors(space, n_models, 5)
        kw = dict(steps=2, guidance=GUIDANCE, n_models=n_models)
        rewards = [ColourMatch(), Brightness()]
        local = evaluate_population(backbone, space, vectors, prompts, seeds, rewards, **kw)
        chunks_before = evaluator.stats.chunks
        remote_scores = remote(evaluator, backbone, space, vectors, prompts, seeds, rewards, **kw)
        assert evaluator.stats.chunks - chunks_before == 2  # 15 images split over both workers
        assert set(remote_scores) == {"colour_match", "brightness"}
        for name in remote_scores:
            assert remote_scores[name].shape == (5, 3) and remote_scores[name].dtype == torch.float32
            torch.testing.assert_close(remote_scores[name], local[name], atol=SCORE_ATOL, rtol=0)
        assert local["colour_match"].std(dim=0).min() > 1e-3  # candidates really differ
    # the unmodified model, a single reward -> a tensor, exactly like evaluate_population
    base_local = evaluate_population(backbone, None, None, prompts, seeds, ColourMatch(), steps=2, guidance=GUIDANCE)
    base_remote = remote(evaluator, backbone, None, None, prompts, seeds, ColourMatch(), steps=2, guidance=GUIDANCE)
    torch.testing.assert_close(base_remote, base_local, atol=SCORE_ATOL, rtol=0)


def test_worker_killed_mid_chunk_is_replaced_and_its_chunk_recomputed(evaluator, backbone, tmp_path):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    vectors = random_vectors(space, 1, 4, seed=5)
    prompts, seeds = make_prompts(2, "train", 40), [3, 4]
    reference = evaluate_population(backbone, space, vectors, prompts, seeds, ColourMatch(), steps=2, guidance=GUIDANCE)
    marker = tmp_path / "blocked-worker-pid"
    killed: list[int] = []

    def kill_the_blocked_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    pids_before = set(evaluator.worker_pids())
    stats_before = (evaluator.stats.retried_chunks, evaluator.stats.respawned_workers)
    killer = threading.Thread(target=kill_the_blocked_worker, daemon=True)
    killer.start()
    scores = remote(
        evaluator, backbone, space, vectors, prompts, seeds, BlockFirstCaller(str(marker)), steps=2, guidance=GUIDANCE
    )
    killer.join(timeout=5)
    assert killed and killed[0] in pids_before  # a worker really died in the middle of its chunk
    assert (evaluator.stats.retried_chunks, evaluator.stats.respawned_workers) == (
        stats_before[0] + 1,
        stats_before[1] + 1,
    )
    torch.testing.assert_close(scores, reference, atol=SCORE_ATOL, rtol=0)
    pids_after = evaluator.worker_pids()
    assert len(pids_after) == 2 and killed[0] not in pids_after


def test_calibration_continues_after_a_worker_dies(evaluator, backbone):
    import ray

    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    train, val = make_prompts(8, "train", 100), make_prompts(3, "val", 200)
    cfg = SearchConfig(max_generations=4, bucket_size=4, popsize=4, val_every=2, seed=3, patience=None)
    search, sampling = SearchSpace.for_model(space, 1, uses_cfg=True), SamplingSettings(steps=2, guidance=GUIDANCE)
    reference = calibrate(backbone, search, train, val, ColourMatch(), sampling, CalibrationOptions(config=cfg))

    respawned_before = evaluator.stats.respawned_workers

    def kill_a_worker(row: dict) -> None:
        if row["generation"] == 1:
            ray.kill(evaluator.workers[0], no_restart=True)

    options = CalibrationOptions(config=cfg, pool=evaluator, on_generation=kill_a_worker)
    result = calibrate(backbone, search, train, val, ColourMatch(), sampling, options)
    assert evaluator.stats.respawned_workers == respawned_before + 1
    assert result.search.n_generations == reference.search.n_generations == 4
    # same rankings -> CMA-ES proposes the same candidates; fitness equal up to float rounding
    for ours, theirs in zip(result.search.candidates, reference.search.candidates):
        np.testing.assert_allclose(ours["vector"], theirs["vector"], rtol=0, atol=1e-9)
        assert ours["fitness"] == pytest.approx(theirs["fitness"], abs=SCORE_ATOL)
    np.testing.assert_allclose(result.vector, reference.vector, rtol=0, atol=1e-9)
    assert result.val_score == pytest.approx(reference.val_score, abs=SCORE_ATOL)


def test_errors_inside_a_worker_propagate_without_retries(evaluator, backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    retried = evaluator.stats.retried_chunks
    with pytest.raises(RewardError, match="nan_reward.*non-finite"):
        remote(
            evaluator,
            backbone,
            space,
            random_vectors(space, 1, 2),
            make_prompts(2, "train"),
            [1, 2],
            NanReward(),
            steps=2,
            guidance=GUIDANCE,
        )
    assert evaluator.stats.retried_chunks == retried
    # bad arguments are refused on the caller's side, before anything is sent
    with pytest.raises(ValueError, match=r"shape \[P, 5\]"):
        remote(evaluator, backbone, space, torch.ones(2, 7), make_prompts(2, "train"), [1, 2], ColourMatch())
    with pytest.raises(ValueError, match="one seed per prompt"):
        remote(evaluator, backbone, space, torch.ones(1, 5), make_prompts(2, "train"), [1], ColourMatch())


def test_a_replica_of_another_model_is_refused(cluster, backbone, evaluator):
    other = CalibrationSpace.from_transformer(backbone.transformer, "layer")
    renamed = CalibrationSpace(other.branches[:-1], "layer", other.model_class)  # a model with one branch less
    with pytest.raises(ValueError, match="different layer calibration space"):
        remote(
            evaluator,
            backbone,
            renamed,
            torch.ones(1, renamed.search_size(1)),
            make_prompts(1, "t"),
            [0],
            ColourMatch(),
            steps=1,
        )


def test_capacity_and_argument_checks(cluster, factory):
    with pytest.raises(ValueError, match="need 4 CPUs and 4 GPUs; the cluster has 3 CPUs and 3 GPUs"):
        RayWorkerPool(factory, n_workers=4)
    with pytest.raises(ValueError, match="n_workers must be a positive int"):
        RayWorkerPool(factory, n_workers=0)
    with pytest.raises(TypeError, match="backbone_factory must be a callable"):
        RayWorkerPool("toy", n_workers=1)


def test_ray_resource_in_process_and_local(cluster, factory, backbone):
    from calibri_pipeline.resources.ray import RayResource

    with RayResource().worker_pool(factory) as none:
        assert none is None  # the default: no Ray at all
    for bad in ("nonsense", "ray://user:secret@head:10001"):
        with pytest.raises(Exception, match="Ray address"):
            RayResource(address=bad)
    with pytest.raises(Exception, match="positive integer"):
        RayResource(address="local", n_workers=0)
    # "local" with Ray already running here: the evaluator joins this cluster (the third CPU)
    with RayResource(address="local", n_workers=1).worker_pool(factory) as ev:
        assert isinstance(ev, RayWorkerPool) and len(ev.workers) == 1
        prompts = make_prompts(2, "val", 7)
        local = evaluate_population(backbone, None, None, prompts, [5, 6], ColourMatch(), steps=1)
        torch.testing.assert_close(
            remote(ev, backbone, None, None, prompts, [5, 6], ColourMatch(), steps=1), local, atol=SCORE_ATOL, rtol=0
        )
    import ray

    assert ray.is_initialized()  # it did not start the cluster, so it does not stop it
