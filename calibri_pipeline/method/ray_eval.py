"""A CMA-ES population scored on Ray actors, each holding its own model replica.

:class:`RayPopulationEvaluator` is a :class:`~calibri_pipeline.method.population.PopulationEvaluator`
like the in-process :class:`~calibri_pipeline.method.population.LocalEvaluator`: same call, same
``[P, B]`` scores, same image cache. Only where missing images are made differs: the jobs are cut into
contiguous chunks that go to the actors one at a time (a worker that finishes early takes the next
chunk), and each worker runs the shared :func:`~calibri_pipeline.method.population.make_and_score`.
An image depends only on its (prompt, seed, vector), so where it is made changes nothing but float
rounding (kernels may round differently with batch shape).

A worker that dies (killed, out of memory, node lost) is replaced by a fresh actor and its chunk
is evaluated again, up to ``max_retries`` times per chunk; an exception raised *inside* a worker
(a reward error, a bad vector) is a real error and propagates unchanged.

Plug it into a calibration with ``calibrate(..., pool=RayWorkerPool(...))``. The
evaluator is not part of the run's fingerprint, so a run can be resumed with a different number of
workers (or in-process) and continues where it stopped.

Ray moves Python objects between processes with (cloud)pickle: the backbone factory, prompts and
rewards travel that way. That is Ray's transport, not storage -- nothing here writes a pickle --
but it does mean a Ray cluster must only be reachable by people you trust (see
:func:`connect_ray`: a local cluster requires a fresh random token).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.method.population import (
    ImageJob,
    PopulationEvaluator,
    SamplingSettings,
    make_and_score,
)
from calibri_pipeline.method.space import SearchSpace

if TYPE_CHECKING:
    from calibri_pipeline.method.sampler import Backbone
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.rewards.base import Reward

BackboneFactory = Callable[[], "Backbone"]


# --------------------------------------------------------------------------------------------
# Connecting to Ray
# --------------------------------------------------------------------------------------------


def connect_ray(
    address: str | None = "local",
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | None = None,
) -> bool:
    """Make sure this process is connected to Ray; return True when this call started the connection.

    ``address``: ``"local"`` (or None) starts a private single-node cluster for this process;
    ``"ray://host:10001"`` connects through Ray Client; ``"auto"`` or ``"host:port"`` joins a
    running cluster from one of its nodes. An already initialised Ray is used as it is.

    A local cluster requires a fresh random 256-bit token for its gRPC services and HTTP API (the
    token stays in this process's environment, so Ray writes no ``~/.ray/auth_token``), has no
    dashboard and no usage reporting, and keeps its session files in ``temp_dir`` (default: a new
    directory under the system temp dir). Ray binds its services to all interfaces (it has no
    loopback-only option): the token is what keeps others out; firewall the machine as usual.
    ``num_cpus``/``num_gpus`` (local only): what it offers; None = what this machine has.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is not None and not isinstance(address, str):
        raise TypeError(f"Ray address must be a str or None, got {type(address).__name__}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "local"):
        no_token = "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ
        if no_token and os.environ.get("RAY_AUTH_MODE", "token") == "token":
            # Ray turns token auth on for a new local cluster by itself (and refreshes its config);
            # a token in the environment keeps it from writing one to ~/.ray/auth_token
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _temp_dir=temp_dir or tempfile.mkdtemp(prefix="calibri-ray-"),
            log_to_driver=False,
        )
        return True
    if not (address == "auto" or address.startswith("ray://") or ":" in address):
        raise ValueError(
            f"Ray address {address!r} is not understood; use 'local', 'auto', 'host:port' or 'ray://host:10001'"
        )
    ray.init(address=address, log_to_driver=False)
    return True


# --------------------------------------------------------------------------------------------
# The worker (one model replica per actor)
# --------------------------------------------------------------------------------------------


class PopulationWorker:
    """Ray actor body: builds its backbone once, then makes and scores chunks of images."""

    def __init__(self, backbone_factory: BackboneFactory, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.backbone = backbone_factory()
        self._spaces: dict[str, CalibrationSpace] = {}
        self._rewards: dict[str, list[Reward]] = {}

    def info(self) -> dict[str, Any]:
        import ray

        device = next(self.backbone.transformer.parameters()).device
        return {
            "pid": os.getpid(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "backbone": getattr(self.backbone, "name", type(self.backbone).__name__),
        }

    def _space(self, granularity: str, names: Sequence[str]) -> CalibrationSpace:
        if granularity not in self._spaces:
            from calibri_pipeline.method.space import CalibrationSpace

            self._spaces[granularity] = CalibrationSpace.from_transformer(self.backbone.transformer, granularity)
        space = self._spaces[granularity]
        if list(space.names) != list(names):
            raise ValueError(
                f"the worker's model has a different {granularity} calibration space than the caller's "
                f"({space.size} vs {len(names)} coefficients): the backbone factory must build the same model"
            )
        return space

    def _reward_list(self, key: str, holder: list[Any]) -> list[Reward]:
        # the rewards come as an object reference inside a list (so Ray does not resolve it on
        # every call): fetched and deserialised once per worker
        if key not in self._rewards:
            import ray

            self._rewards[key] = ray.get(holder[0])
        return self._rewards[key]

    def evaluate(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Make and score one chunk: ``{"scores": {reward: [n]}, "images": uint8 [n, 3, H, W] or None}``."""
        rewards = self._reward_list(request["reward_key"], request["rewards"])
        search = None
        if request["search"] is not None:
            record = request["search"]
            search = SearchSpace.from_dict(record, self._space(record["granularity"], record["names"]))
        vectors = request["vectors"]
        jobs = [
            ImageJob(prompt, seed, None if vectors[i] is None else torch.from_numpy(vectors[i]), "", "", guidance)
            for i, (prompt, seed, guidance) in enumerate(
                zip(request["prompts"], request["seeds"], request["guidances"])
            )
        ]
        scores, images = make_and_score(self.backbone, search, jobs, request["sampling"], rewards)
        uint8 = None if not request["want_images"] else (images * 255.0).round().to(torch.uint8).numpy()
        return {"scores": scores, "images": uint8}


# --------------------------------------------------------------------------------------------
# The evaluator (driver side)
# --------------------------------------------------------------------------------------------


@dataclass
class PoolStats:
    """What a worker pool did so far (across calls)."""

    calls: int = 0
    images: int = 0
    chunks: int = 0
    retried_chunks: int = 0
    respawned_workers: int = 0
    seconds: float = 0.0


class RayWorkerPool:
    """``n_workers`` Ray actors, each holding a model replica, that make and score chunks of images.

    :meth:`evaluator` gives the :class:`RayPopulationEvaluator` of a backbone, search space, rewards
    and sampling settings on this pool (see the module docstring).

    - ``backbone_factory``: a picklable zero-argument callable that builds the model inside a worker
      (e.g. ``functools.partial(load_toy_backbone, "/ckpt")`` or :class:`calibri_pipeline.models.ModelFactory`); every
      worker must get the same model as the caller's ``space`` was built on (checked by name).
    - ``address``: where Ray runs (:func:`connect_ray`); ignored when Ray is already initialised.
    - ``threads_per_worker``: torch CPU threads (and Ray CPUs) per actor.
    - ``gpus_per_worker``: Ray GPUs per actor; None = 1 when the cluster has GPUs, else 0.
    - ``chunks_per_worker``: chunks per call and worker (>1 balances uneven workers).
    - ``max_retries``: re-evaluations of one chunk after worker deaths before giving up.
    """

    def __init__(
        self,
        backbone_factory: BackboneFactory,
        n_workers: int = 1,
        *,
        address: str | None = None,
        threads_per_worker: int = 1,
        gpus_per_worker: float | None = None,
        chunks_per_worker: int = 1,
        max_retries: int = 3,
        start_timeout_s: float = 600.0,
        temp_dir: str | None = None,
    ) -> None:
        if not callable(backbone_factory):
            raise TypeError(
                f"backbone_factory must be a callable that builds a backbone, got {type(backbone_factory).__name__}"
            )
        for name, value in (
            ("n_workers", n_workers),
            ("threads_per_worker", threads_per_worker),
            ("chunks_per_worker", chunks_per_worker),
        ):
            positive_int(name, value)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if gpus_per_worker is not None and not (gpus_per_worker >= 0):
            raise ValueError(f"gpus_per_worker must be >= 0 or None, got {gpus_per_worker!r}")
        import ray

        self._ray = ray
        self.backbone_factory = backbone_factory
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.chunks_per_worker = chunks_per_worker
        self.max_retries = max_retries
        self.stats = PoolStats()
        self._workers: list[Any] = []
        self._reward_cache: dict[tuple[int, ...], tuple[str, list[Any], list[Reward]]] = {}
        self._created_temp_dir: str | None = None
        if not ray.is_initialized() and address in (None, "local") and temp_dir is None:
            # ours, so close() can remove the session files again
            temp_dir = self._created_temp_dir = tempfile.mkdtemp(prefix="calibri-ray-")
        self._owns_ray = connect_ray(address, temp_dir=temp_dir)
        try:
            resources = ray.cluster_resources()
            if gpus_per_worker is None:
                gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
            self.gpus_per_worker = float(gpus_per_worker)
            self._check_capacity(resources)
            self._actor_class = ray.remote(PopulationWorker).options(
                num_cpus=threads_per_worker,
                num_gpus=self.gpus_per_worker,
                max_restarts=0,
                max_task_retries=0,
            )
            self._workers = [self._spawn() for _ in range(n_workers)]
            self.worker_info: list[dict[str, Any]] = self._wait_ready(range(n_workers), start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- workers -----------------------------------------------------------------------------

    def _check_capacity(self, resources: Mapping[str, float]) -> None:
        need_cpu = self.n_workers * self.threads_per_worker
        need_gpu = self.n_workers * self.gpus_per_worker
        have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if need_cpu > have_cpu or need_gpu > have_gpu:
            raise ValueError(
                f"{self.n_workers} Ray workers with {self.threads_per_worker} CPU(s) and {self.gpus_per_worker:g} GPU(s) "
                f"each need {need_cpu} CPUs and {need_gpu:g} GPUs; the cluster has {have_cpu:g} CPUs and "
                f"{have_gpu:g} GPUs. Lower n_workers / threads_per_worker or add nodes"
            )

    def _spawn(self) -> Any:
        return self._actor_class.remote(self.backbone_factory, self.threads_per_worker)

    def _wait_ready(self, slots: Sequence[int] | range, timeout: float) -> list[dict[str, Any]]:
        refs = [self._workers[i].info.remote() for i in slots]
        try:
            return self._ray.get(refs, timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"Ray workers did not start within {timeout:g} s (is the cluster short of CPUs/GPUs?)"
            ) from None
        except self._ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"a Ray worker failed to build its backbone: {exc}") from exc

    def _respawn(self, slot: int) -> None:
        try:
            self._ray.kill(self._workers[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._workers[slot] = self._spawn()
        self.stats.respawned_workers += 1

    @property
    def workers(self) -> list[Any]:
        """The current actor handles (a respawned worker has a new handle)."""
        return list(self._workers)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (asks them; a dead one is respawned first)."""
        pids = []
        for slot in range(len(self._workers)):
            try:
                pids.append(self._ray.get(self._workers[slot].info.remote())["pid"])
            except self._ray.exceptions.RayActorError:
                self._respawn(slot)
                pids.append(self._ray.get(self._workers[slot].info.remote())["pid"])
        return pids

    def close(self) -> None:
        """Stop the workers (and the local Ray cluster, when this evaluator started it)."""
        for handle in getattr(self, "_workers", []):
            try:
                self._ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._workers = []
        if getattr(self, "_owns_ray", False) and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False
        if getattr(self, "_created_temp_dir", None):
            shutil.rmtree(self._created_temp_dir, ignore_errors=True)
            self._created_temp_dir = None

    def __enter__(self) -> RayWorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- rewards travel once -----------------------------------------------------------------

    def _rewards_ref(self, rewards: list[Reward]) -> tuple[str, list[Any]]:
        key = tuple(id(r) for r in rewards)
        cached = self._reward_cache.get(key)
        # the cache keeps the reward objects alive, so their ids cannot be reused by others
        if cached is None or any(a is not b for a, b in zip(cached[2], rewards)):
            cached = (secrets.token_hex(8), [self._ray.put(list(rewards))], list(rewards))
            self._reward_cache[key] = cached
        return cached[0], cached[1]

    # -- evaluation --------------------------------------------------------------------------

    def evaluator(
        self,
        backbone: Backbone,
        search: SearchSpace | None,
        rewards: Any,
        sampling: SamplingSettings | None = None,
        **options: Any,
    ) -> RayPopulationEvaluator:
        """A population evaluator whose missing images are made on this pool's workers.

        ``backbone`` is the caller's own replica: it gives sampling defaults and the identity that
        keys the image cache (``options``: ``cache``, ``model``, ``progress``); no image is made on it.
        """
        if not self._workers:
            raise RuntimeError("this RayWorkerPool is closed")
        return RayPopulationEvaluator(backbone, search, rewards, sampling, pool=self, **options)

    def make_and_score(
        self,
        jobs: Sequence[ImageJob],
        search: SearchSpace | None,
        sampling: SamplingSettings,
        rewards: Sequence[Reward],
        *,
        want_images: bool,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        """:func:`~calibri_pipeline.method.population.make_and_score` of ``jobs``, chunk by chunk on the workers."""
        if not self._workers:
            raise RuntimeError("this RayWorkerPool is closed")
        started = time.perf_counter()
        reward_key, reward_holder = self._rewards_ref(list(rewards))
        common = {
            "reward_key": reward_key,
            "rewards": reward_holder,
            "sampling": sampling,
            "want_images": want_images,
            "search": None if search is None else search.to_dict(),  # the run record; the worker rebuilds it
        }
        n_images = len(jobs)
        n_chunks = min(n_images, len(self._workers) * self.chunks_per_worker)
        bounds = np.linspace(0, n_images, n_chunks + 1).round().astype(int)

        def request(chunk: int) -> dict[str, Any]:
            part = jobs[int(bounds[chunk]) : int(bounds[chunk + 1])]
            return dict(
                common,
                prompts=[j.prompt for j in part],
                seeds=[j.seed for j in part],
                guidances=[j.guidance for j in part],
                vectors=[None if j.vector is None else j.vector.numpy() for j in part],
            )

        def done(chunk: int) -> None:
            if progress is not None:
                progress(int(bounds[chunk + 1] - bounds[chunk]))

        results = self._run_chunks(n_chunks, request, done)
        scores = {r.name: np.concatenate([results[c]["scores"][r.name] for c in range(n_chunks)]) for r in rewards}
        images = None
        if want_images:
            images = torch.from_numpy(np.concatenate([results[c]["images"] for c in range(n_chunks)])).float() / 255.0
        self.stats.calls += 1
        self.stats.images += n_images
        self.stats.chunks += n_chunks
        self.stats.seconds += time.perf_counter() - started
        return scores, images

    def _run_chunks(
        self, n_chunks: int, request: Callable[[int], dict[str, Any]], done: Callable[[int], None]
    ) -> dict[int, dict[str, Any]]:
        ray = self._ray
        pending: deque[int] = deque(range(n_chunks))
        idle: deque[int] = deque(range(len(self._workers)))
        in_flight: dict[Any, tuple[int, int]] = {}
        attempts = [0] * n_chunks
        results: dict[int, dict[str, Any]] = {}
        while pending or in_flight:
            while pending and idle:
                slot, chunk = idle.popleft(), pending.popleft()
                in_flight[self._workers[slot].evaluate.remote(request(chunk))] = (chunk, slot)
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            chunk, slot = in_flight.pop(ready)
            try:
                results[chunk] = ray.get(ready)
                done(chunk)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError,
            ) as exc:
                attempts[chunk] += 1
                if attempts[chunk] > self.max_retries:
                    raise RuntimeError(
                        f"chunk {chunk} of the population failed on {attempts[chunk]} Ray workers in a row "
                        f"(max_retries={self.max_retries}); last error: {exc}"
                    ) from exc
                self.stats.retried_chunks += 1
                self._respawn(slot)
                pending.appendleft(chunk)
            idle.append(slot)
        return results


class RayPopulationEvaluator(PopulationEvaluator):
    """A :class:`~calibri_pipeline.method.population.PopulationEvaluator` whose images are made on a
    :class:`RayWorkerPool` (build it with :meth:`RayWorkerPool.evaluator`)."""

    def __init__(
        self,
        backbone: Backbone,
        search: SearchSpace | None,
        rewards: Any,
        sampling: SamplingSettings | None = None,
        *,
        pool: RayWorkerPool,
        **options: Any,
    ) -> None:
        super().__init__(backbone, search, rewards, sampling, **options)
        self.pool = pool

    def _make(
        self, jobs: Sequence[ImageJob], *, want_images: bool, bar: Any
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        progress = (lambda k: bar.update(k)) if bar is not None else None
        return self.pool.make_and_score(
            jobs, self.search, self.sampling, self.rewards, want_images=want_images, progress=progress
        )


__all__ = ["RayWorkerPool", "RayPopulationEvaluator", "PoolStats", "PopulationWorker", "connect_ray"]
