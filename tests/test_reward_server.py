"""The reward server as a real subprocess on loopback, and the HTTP client's failure handling."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import RewardError
from calibri_pipeline.rewards.client import HTTPReward
from calibri_pipeline.rewards.registry import make_reward
from calibri_pipeline.rewards.server import RewardHTTPServer

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


# --- rewards the server subprocess imports from this module ("test_reward_server:ColourMean") -------------
class ColourMean:
    """Mean of the channel a prompt names (red/green/blue), plus a tiny text-length term so the prompt
    that arrives on the server side matters."""

    name = "colour_mean"
    higher_is_better = True
    scale = (0.0, 2.0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        channel = {"red": 0, "green": 1, "blue": 2}
        out = []
        for img, p in zip(images, prompts):
            c = next((i for word, i in channel.items() if word in p.text), 0)
            out.append(img[c].mean() + 0.001 * len(p.text) + (0.5 if (p.spec or {}).get("bonus") else 0.0))
        return torch.stack(out).float()


class Exploding:
    name = "exploding"
    higher_is_better = True
    scale = None

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        raise RuntimeError("the model ran out of memory")


class Flaky(ColourMean):
    """Fails with a transient error (a dropped connection of its own) on its first ``fails`` calls."""

    name = "flaky"
    fails = 2
    calls = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls <= type(self).fails:
            raise ConnectionError("the upstream model service dropped the connection")
        return super().__call__(images, prompts)


class CountingExploding(Exploding):
    calls = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        type(self).calls += 1
        return super().__call__(images, prompts)


def make_nan_reward() -> ColourMean:
    """A factory (module:attr pointing to a function) whose reward yields NaN."""

    class NaNReward(ColourMean):
        name = "nan_reward"

        def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
            scores = super().__call__(images, prompts)
            scores[0] = float("nan")
            return scores

    return NaNReward()


# --- helpers ---------------------------------------------------------------------------------------------
def _eight_bit_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images that are exactly representable in an 8-bit PNG, so served and in-process scores agree exactly."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen).float() / 255.0


def _prompts(n: int) -> list[Prompt]:
    words = ["red", "green", "blue"]
    return [
        Prompt(text=f"a {words[i % 3]} thing number {i}", spec={"bonus": i % 2 == 0}, category="colour", source="test")
        for i in range(n)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(spec: str, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibri_pipeline.rewards.server", "--reward", spec, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )
    line = _read_line_with_timeout(proc, 90.0)
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    url = line.split("listening on ", 1)[1].split()[0]
    return proc, url


def _read_line_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def colour_server() -> Iterator[str]:
    proc, url = _start_server("test_reward_server:ColourMean")
    try:
        yield url
    finally:
        _stop(proc)


# --- a real server process -------------------------------------------------------------------------------
def test_served_scores_equal_in_process_scores(colour_server: str) -> None:
    images, prompts = _eight_bit_images(7), _prompts(7)
    client = HTTPReward(colour_server, batch_size=3, timeout=30)
    assert (client.name, client.higher_is_better, client.scale) == ("colour_mean", True, (0.0, 2.0))
    served = client(images, prompts)
    local = ColourMean()(images, prompts)
    assert served.dtype == torch.float32 and served.shape == (7,)
    torch.testing.assert_close(served, local, atol=1e-6, rtol=0)
    # the registry's http: forms give the same client
    for spec in (colour_server, "http:" + colour_server.removeprefix("http://")):
        torch.testing.assert_close(make_reward(spec, timeout=30)(images, prompts), local, atol=1e-6, rtol=0)
    # a served reward inside a weighted sum
    mixed = make_reward(f"{colour_server}*0.5+test_reward_server:ColourMean*2")
    torch.testing.assert_close(mixed(images, prompts), 2.5 * local, atol=1e-5, rtol=0)


def test_float_images_are_rounded_to_8_bits(colour_server: str) -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = _prompts(2)
    served = HTTPReward(colour_server)(images, prompts)
    rounded = (images * 255).round() / 255
    torch.testing.assert_close(served, ColourMean()(rounded, prompts), atol=1e-6, rtol=0)


def test_server_rejects_bad_requests_with_400(colour_server: str) -> None:
    def post(body: bytes) -> tuple[int, str]:
        req = urllib.request.Request(colour_server + "/score", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]

    code, msg = post(b"{not json")
    assert code == 400 and "not valid JSON" in msg
    code, msg = post(json.dumps({"images": ["aGVsbG8="], "prompts": [{"text": "x"}]}).encode())
    assert code == 400 and "not a base64-encoded PNG" in msg
    code, msg = post(json.dumps({"images": [], "prompts": []}).encode())
    assert code == 400 and "empty" in msg
    code, msg = post(json.dumps({"images": ["x"], "prompts": []}).encode())
    assert code == 400 and "1 images but 0 prompts" in msg
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(colour_server + "/nope", timeout=10)
    assert info.value.code == 404


@contextlib.contextmanager
def _in_thread(reward) -> Iterator[RewardHTTPServer]:
    """The same server code in a thread (no self-test), for rewards that fail after start-up."""
    server = RewardHTTPServer(reward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_reward_failure_and_nan_become_errors() -> None:
    # a deterministic failure: answered 500 with retryable=false, tried once, counted in /health
    CountingExploding.calls = 0
    with _in_thread(CountingExploding()) as server:
        client = HTTPReward(server.url, retries=3, backoff=0.01, timeout=30)
        with pytest.raises(RewardError, match=r"HTTP 500; not retried.*ran out of memory"):
            client(_eight_bit_images(2), _prompts(2))
        assert CountingExploding.calls == 1
        health = client.health()
        assert health["failed"] == 1 and "ran out of memory" in health["last_error"] and health["self_test"] is None
    with _in_thread(make_nan_reward()) as server:
        with pytest.raises(RewardError, match="non-finite"):
            HTTPReward(server.url, retries=0)(_eight_bit_images(2), _prompts(2))


def test_transient_reward_failures_are_retried() -> None:
    Flaky.calls, Flaky.fails = 0, 2
    images, prompts = _eight_bit_images(2), _prompts(2)
    with _in_thread(Flaky()) as server:
        scores = HTTPReward(server.url, retries=2, backoff=0.01)(images, prompts)
        assert Flaky.calls == 3  # 503, 503, then the answer
        torch.testing.assert_close(scores, ColourMean()(images, prompts), rtol=0, atol=0)
        Flaky.calls, Flaky.fails = 0, 5
        with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\): HTTP 503: .*dropped the connection"):
            HTTPReward(server.url, retries=1, backoff=0.01)(images, prompts)
        assert Flaky.calls == 2


def _run_server_to_exit(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "calibri_pipeline.rewards.server", "--port", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--reward", "test_reward_server:Exploding"],
            r"failed its self-test .*RuntimeError: the model ran out of memory",
        ),
        (
            ["--reward", "world_score", "--kwargs", '{"bogus": 1}'],
            r"cannot build reward 'world_score': TypeError: .*bogus",
        ),
        (["--reward", "hpsv3"], r"cannot build reward 'hpsv3': ImportError: .*pip install hpsv3"),
        (["--reward", "world_score", "--kwargs", "[1]"], r"--kwargs must be a JSON object, got list"),
    ],
)
def test_server_that_cannot_score_exits_before_listening(args: list[str], message: str) -> None:
    done = _run_server_to_exit(*args)
    assert done.returncode == 1, done.stderr
    assert "listening" not in done.stdout
    assert re.search(message, done.stderr), done.stderr


def test_health_reports_the_self_test(colour_server: str) -> None:
    info = HTTPReward(colour_server).health()
    assert info["self_test"]["passed"] is True and info["self_test"]["seconds"] >= 0
    assert info["failed"] == 0 and info["last_error"] is None


def test_server_down_gives_clear_error_quickly() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\): cannot reach the server"):
        HTTPReward(url, retries=2, backoff=0.05, timeout=5)
    assert time.monotonic() - start < 5.0
    client = HTTPReward(url, retries=1, backoff=0.05, timeout=5, name="x", higher_is_better=True, scale=None)
    with pytest.raises(RewardError, match="cannot reach"):
        client(_eight_bit_images(1), _prompts(1))


def test_server_killed_between_calls(colour_server: str) -> None:
    proc, url = _start_server("test_reward_server:ColourMean")
    client = HTTPReward(url, retries=1, backoff=0.05, timeout=10)
    client(_eight_bit_images(1), _prompts(1))
    _stop(proc)
    with pytest.raises(RewardError, match="cannot reach"):
        client(_eight_bit_images(1), _prompts(1))


# --- a misbehaving server written here ------------------------------------------------------------------
class _BadHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "notjson"
    hits = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        type(self).hits += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        n = 2
        mode = type(self).mode
        if mode == "slow":
            time.sleep(2.0)
        status, body = {
            "notjson": (200, b"<html>hello</html>"),
            "short": (200, json.dumps({"scores": [1.0]}).encode()),
            "nan": (200, b'{"scores": [1.0, NaN]}'),
            "strings": (200, json.dumps({"scores": ["1.0", 2.0]}).encode()),
            "noscores": (200, json.dumps({"result": [1.0] * n}).encode()),
            "500": (503, json.dumps({"error": "overloaded"}).encode()),
            "500final": (500, json.dumps({"error": "dtype mismatch", "retryable": False}).encode()),
            "502bare": (502, b"<html>bad gateway</html>"),
            "400": (400, json.dumps({"error": "bad prompt"}).encode()),
            "slow": (200, json.dumps({"scores": [1.0] * n}).encode()),
            "other_name": (200, json.dumps({"name": "someone_else", "scores": [1.0] * n}).encode()),
        }[mode]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"status": "ok", "name": "bad", "higher_is_better": True, "scale": None}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def bad_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BadHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("mode", "message", "attempts"),
    [
        ("notjson", "not JSON", 1),
        ("short", "returned 1 scores for 2 images", 1),
        ("nan", "non-finite or non-numeric score", 1),
        ("strings", "non-finite or non-numeric score '1.0'", 1),
        ("noscores", "without 'scores'", 1),
        ("500", r"failed after 3 attempt\(s\): HTTP 503: overloaded", 3),
        ("500final", r"HTTP 500; not retried.*dtype mismatch", 1),
        ("502bare", r"failed after 3 attempt\(s\): HTTP 502: Bad Gateway", 3),
        ("400", r"rejected the request \(HTTP 400\): bad prompt", 1),
        ("slow", "did not answer within 0.5 s", 1),
        ("other_name", "now serves 'someone_else'", 1),
    ],
)
def test_bad_answers_raise(bad_server: str, mode: str, message: str, attempts: int) -> None:
    _BadHandler.mode, _BadHandler.hits = mode, 0
    client = HTTPReward(bad_server, retries=2, backoff=0.01, timeout=0.5)
    assert client.name == "bad"
    with pytest.raises(RewardError, match=message):
        client(_eight_bit_images(2), _prompts(2))
    assert _BadHandler.hits == attempts


def test_client_argument_checks() -> None:
    with pytest.raises(ValueError, match="http://"):
        HTTPReward("127.0.0.1:80")
    with pytest.raises(ValueError, match="timeout"):
        HTTPReward("http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="batch_size"):
        HTTPReward("http://127.0.0.1:1", batch_size=0, name="x", higher_is_better=True, scale=None)


# --- the embedded world's rewards, served ----------------------------------------------------------------
def _world_batch(n: int) -> tuple[torch.Tensor, list[Prompt]]:
    """Ground-truth renders of random world prompts, half of them degraded so scores spread out."""
    import numpy as np

    from calibri_pipeline.world import realize, render, sample_prompt

    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng) for _ in range(n)]
    images = torch.stack(
        [torch.from_numpy(render(realize(p.spec, rng))).permute(2, 0, 1).float() / 255.0 for p in prompts]
    )
    noise = torch.randint(-60, 61, images.shape, generator=torch.Generator().manual_seed(1)).float() / 255.0
    images[::2] = (images[::2] + noise[::2]).clamp(0, 1)
    return images, prompts


@pytest.mark.parametrize("spec", ["world_score", "world_alignment*0.5+world_quality*0.5"])
def test_world_reward_served_equals_in_process(spec: str) -> None:
    images, prompts = _world_batch(10)
    proc, url = _start_server(spec)
    try:
        client = HTTPReward(url, batch_size=4, timeout=60)
        served = client(images, prompts)
    finally:
        _stop(proc)
    local = make_reward(spec)
    assert client.name == local.name and client.scale == local.scale
    expected = local(images, prompts)
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=0)
    assert expected.std() > 0.01  # not a constant: the comparison means something
