"""Serve one reward over HTTP from its own process (and, if need be, its own virtualenv).

    python -m calibri_pipeline.rewards.server --reward hpsv3 --port 8001 --kwargs '{"device": "cuda"}'
    python -m calibri_pipeline.rewards.server --reward mypkg.rewards:make_reward --port 0

``--reward`` takes anything :func:`calibri_pipeline.rewards.registry.make_reward` does. Before it listens,
the server builds the reward and scores one probe image with it (``--no-self-test`` skips the probe): a
missing package, a bad ``--kwargs`` or a model that cannot run on this device ends the process with
exit code 1 and the reason on stderr, instead of a server that says OK and fails every request.
``--port 0`` picks a free port; the first line on stdout always says where the server listens
(``calibri-reward-server listening on http://127.0.0.1:PORT name=...``). The protocol is described in
:mod:`calibri_pipeline.rewards.client`. The reward runs behind a lock: requests are accepted concurrently,
scored one at a time (GPU models are not re-entrant).

This module needs only the standard library, torch, pillow and numpy, plus the served reward's own
dependencies, so a reward with conflicting pins (HPSv3 wants transformers 4.45) runs from a virtualenv
that has just that reward and this project installed with ``--no-deps``: ``calibri reward-env NAME DIR``
builds it with tested pins.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import Reward, check_scores
from calibri_pipeline.rewards.common import decode_png

DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024


class _BadRequest(Exception):
    pass


#: failures of a reward call that may pass on a later try (the same images give the same answer otherwise):
#: a full GPU, or a reward that itself talks to another service
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, torch.cuda.OutOfMemoryError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def self_test(reward: Reward, size: int = 64) -> dict[str, Any]:
    """Score one mid-grey ``size`` x ``size`` image so that loading, preprocessing and the forward pass all
    run once (lazy adapters load their weights here). Returns what ``/health`` reports about it."""
    import numpy as np

    from calibri_pipeline.world.grammar import sample_prompt

    image = torch.full((1, 3, size, size), 0.5)
    # a world prompt: plain text for text rewards, and the scene spec the embedded world's rewards need
    prompt = sample_prompt(np.random.default_rng(0), "single")
    start = time.perf_counter()
    score = check_scores(reward.name, reward(image, [prompt]), 1)
    return {"passed": True, "seconds": round(time.perf_counter() - start, 3), "score": float(score[0])}


class RewardRequestHandler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            sys.stderr.write(f"[reward-server] {self.address_string()} {format % args}\n")

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/") != "/health":
            self._send_json(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})
            return
        server, reward = self.server, self.server.reward
        scale = list(reward.scale) if reward.scale is not None else None
        self._send_json(
            200,
            {
                "status": "ok",
                "name": reward.name,
                "higher_is_better": bool(reward.higher_is_better),
                "scale": scale,
                "self_test": server.self_test,  # None when it was skipped
                "scored": server.scored,
                "failed": server.failed,
                "last_error": server.last_error,
            },
        )

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/") != "/score":
            self._send_json(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})
            return
        try:
            images, prompts = self._read_score_request()
        except _BadRequest as exc:
            self._send_json(400, {"error": str(exc)})
            return
        server, reward = self.server, self.server.reward
        try:
            with server.lock:
                scores = check_scores(reward.name, reward(images, prompts), images.shape[0])
                server.scored += images.shape[0]
        except Exception as exc:  # noqa: BLE001 - any reward failure is reported to the client
            message = f"reward {reward.name!r} failed: {type(exc).__name__}: {exc}"
            with server.lock:
                server.failed += 1
                server.last_error = message
            # 503 = try again later (a full GPU); 500 = this request fails the same way every time
            transient = is_transient(exc)
            self._send_json(503 if transient else 500, {"error": message, "retryable": transient})
            return
        self._send_json(200, {"name": reward.name, "scores": [float(s) for s in scores.tolist()]})

    def _read_score_request(self) -> tuple[torch.Tensor, list[Prompt]]:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _BadRequest("Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            raise _BadRequest(f"bad Content-Length {length_header!r}") from None
        if length < 0 or length > self.server.max_body_bytes:
            raise _BadRequest(f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise _BadRequest("body must be a JSON object with 'images' and 'prompts'")
        images_b64, prompt_dicts = payload.get("images"), payload.get("prompts")
        if not isinstance(images_b64, list) or not isinstance(prompt_dicts, list):
            raise _BadRequest("'images' (list of base64 PNG) and 'prompts' (list of prompt records) are required")
        if not images_b64:
            raise _BadRequest("'images' is empty")
        if len(images_b64) != len(prompt_dicts):
            raise _BadRequest(f"{len(images_b64)} images but {len(prompt_dicts)} prompts")
        tensors = []
        for i, item in enumerate(images_b64):
            if not isinstance(item, str):
                raise _BadRequest(f"images[{i}] must be a base64 string")
            try:
                tensors.append(decode_png(base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError, OSError) as exc:
                raise _BadRequest(f"images[{i}] is not a base64-encoded PNG: {exc}") from None
        if len({t.shape for t in tensors}) != 1:
            raise _BadRequest(
                f"all images of a request must have one size, got {sorted({tuple(t.shape) for t in tensors})}"
            )
        prompts = []
        for i, record in enumerate(prompt_dicts):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise _BadRequest(f"prompts[{i}] must be a prompt record with a 'text' string")
            prompts.append(Prompt.from_dict(record))
        return torch.stack(tensors), prompts


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        reward: Reward,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        verbose: bool = False,
        self_test: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(reward, Reward):
            raise TypeError(f"reward must follow the Reward protocol, got {type(reward).__name__}")
        self.reward = reward
        self.self_test = self_test
        self.scored = self.failed = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose
        super().__init__((host, port), RewardRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="calibri serve-reward",
        description="Serve one calibri reward over HTTP (also: python -m calibri_pipeline.rewards.server).",
    )
    parser.add_argument("--reward", required=True, help="a make_reward spec: name, 'pkg.module:attr' or weighted sum")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one; see the first stdout line)")
    parser.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_BYTES // (1024 * 1024))
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument(
        "--no-self-test", action="store_true", help="listen without scoring a probe image first (not recommended)"
    )
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"calibri-reward-server: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        return _fail(f"--kwargs must be a JSON object: {exc}")
    if not isinstance(kwargs, dict):
        return _fail(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    from calibri_pipeline.rewards.registry import make_reward

    # everything that can fail for good fails here, before the port opens: a client never meets a
    # server that is up but cannot score
    # what the reward's packages print while they load goes to stderr: stdout's first line is the address
    with contextlib.redirect_stdout(sys.stderr):
        try:
            reward = make_reward(args.reward, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to build the reward ends the process with its reason
            return _fail(f"cannot build reward {args.reward!r}: {type(exc).__name__}: {exc}")
        probe = None
        if not args.no_self_test:
            print(f"calibri-reward-server: loading {reward.name} and scoring a probe image ...", flush=True)
            try:
                probe = self_test(reward)
            except Exception as exc:  # noqa: BLE001 - as above
                return _fail(
                    f"reward {reward.name!r} failed its self-test (one 64x64 image): {type(exc).__name__}: {exc}"
                )
    server = RewardHTTPServer(
        reward,
        args.host,
        args.port,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        verbose=args.verbose,
        self_test=probe,
    )
    print(f"calibri-reward-server listening on {server.url} name={reward.name}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
