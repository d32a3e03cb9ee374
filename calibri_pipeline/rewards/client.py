"""``HTTPReward``: a reward scored by :mod:`calibri_pipeline.rewards.server` in another process.

Protocol (JSON over HTTP/1.1):

- ``GET /health`` -> ``{"status": "ok", "name": ..., "higher_is_better": ..., "scale": [lo, hi] | null}``
- ``POST /score`` with ``{"images": [base64 PNG, ...], "prompts": [Prompt.to_dict(), ...]}`` ->
  ``{"name": ..., "scores": [float, ...]}``; errors come back as ``{"error": message, "retryable": bool}``
  with status 400 (a bad request), 500 (the reward failed in a way the same request would again: not
  retried) or 503 (a transient failure such as a full GPU: retried).

Images travel as 8-bit PNG (lossless for 8-bit images, i.e. exactly what the pipeline stores); a float
image is rounded to the nearest 1/255 first. Every failure — server down, timeout, a 5xx after all
retries, a malformed, short, or non-finite answer — raises :class:`RewardError`; a score is never
silently replaced. Connection failures and 5xx answers are retried (``retries`` times, exponential
``backoff``) unless the server says the failure is not retryable; 4xx answers are not, and neither is a
request that times out, since a reward too slow once will be too slow again.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import RewardError, check_images, check_scores
from calibri_pipeline.rewards.common import batch_slices, check_batch_size, check_prompts, encode_png, to_uint8


class _Retryable(Exception):
    """A failure worth another try (connection refused/reset, HTTP 5xx)."""


class HTTPReward:
    """Client for a reward server. ``name``/``higher_is_better``/``scale`` come from the server's
    ``/health`` at construction unless all three are given."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 16,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        name: str | None = None,
        higher_is_better: bool | None = None,
        scale: tuple[float, float] | None | str = "ask",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server url must start with http:// or https://, got {url!r}")
        if "@" in urllib.parse.urlsplit(url).netloc:
            # the url appears in every error message; the protocol has no authentication anyway
            raise ValueError("reward server url must not carry credentials (user:password@)")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
        self.url = url.rstrip("/")
        self.batch_size = check_batch_size(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        #: the name the server reported (checked on every answer, so a port mix-up is caught)
        self.served_name: str | None = None
        if name is None or higher_is_better is None or (isinstance(scale, str) and scale == "ask"):
            info = self.health()
            self.served_name = info["name"]
            name = name if name is not None else info["name"]
            higher_is_better = higher_is_better if higher_is_better is not None else info["higher_is_better"]
            if isinstance(scale, str):
                scale = info["scale"]
        self.name: str = str(name)
        self.higher_is_better: bool = bool(higher_is_better)
        self.scale: tuple[float, float] | None = None if scale is None else (float(scale[0]), float(scale[1]))

    # -- transport ---------------------------------------------------------------------------------
    def _request_once(self, path: str, body: bytes | None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST" if body is not None else "GET",
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail, retryable = _error_detail(exc)
            if exc.code >= 500 and retryable is not False:
                raise _Retryable(f"HTTP {exc.code}: {detail}") from exc
            if exc.code >= 500:
                raise RewardError(
                    f"reward server {self.url}{path} failed (HTTP {exc.code}; not retried, the server says the same "
                    f"request fails the same way): {detail}"
                ) from exc
            raise RewardError(
                f"reward server {self.url}{path} rejected the request (HTTP {exc.code}): {detail}"
            ) from exc
        except TimeoutError as exc:
            raise RewardError(f"reward server {self.url}{path} did not answer within {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise RewardError(f"reward server {self.url}{path} did not answer within {self.timeout:g} s") from exc
            raise _Retryable(f"cannot reach the server ({exc.reason})") from exc
        except (ConnectionError, OSError) as exc:  # reset mid-answer, broken pipe
            raise _Retryable(f"connection failed ({exc})") from exc
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RewardError(
                f"reward server {self.url}{path} sent an answer that is not JSON: {payload[:200]!r}"
            ) from exc

    def _request(self, path: str, body: bytes | None = None) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._request_once(path, body)
            except _Retryable as exc:
                last = str(exc)
                if attempt < self.retries:
                    time.sleep(self.backoff * (2**attempt))
        raise RewardError(f"reward server {self.url}{path} failed after {self.retries + 1} attempt(s): {last}")

    # -- API ---------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        info = self._request("/health")
        if not isinstance(info, dict) or info.get("status") != "ok" or not isinstance(info.get("name"), str):
            raise RewardError(f"reward server {self.url}/health gave an unexpected answer: {str(info)[:200]}")
        scale = info.get("scale")
        if scale is not None and not (isinstance(scale, list) and len(scale) == 2):
            raise RewardError(f"reward server {self.url}/health: scale must be [lo, hi] or null, got {scale!r}")
        if not isinstance(info.get("higher_is_better"), bool):
            raise RewardError(f"reward server {self.url}/health: higher_is_better missing or not a bool")
        return info

    def _score_batch(self, images: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
        body = json.dumps(
            {
                "images": [base64.b64encode(encode_png(img)).decode("ascii") for img in to_uint8(images)],
                "prompts": [p.to_dict() for p in prompts],
            }
        ).encode()
        answer = self._request("/score", body)
        n = images.shape[0]
        if not isinstance(answer, dict) or "scores" not in answer:
            raise RewardError(f"reward server {self.url}/score answered without 'scores': {str(answer)[:200]}")
        served = answer.get("name")
        if self.served_name is not None and served is not None and served != self.served_name:
            raise RewardError(
                f"reward server {self.url} now serves {served!r}, but it served {self.served_name!r} before"
            )
        raw = answer["scores"]
        if not isinstance(raw, list) or len(raw) != n:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise RewardError(f"reward server {self.url}/score returned {got} scores for {n} images")
        values: list[float] = []
        for i, value in enumerate(raw):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(
                    f"reward server {self.url}/score returned a non-finite or non-numeric score {value!r} for image {i}"
                )
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float32)

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        scores = [self._score_batch(images[sl], prompts[sl]) for sl in batch_slices(images.shape[0], self.batch_size)]
        return check_scores(self.name, torch.cat(scores) if scores else torch.zeros(0), images.shape[0])


def _error_detail(exc: urllib.error.HTTPError) -> tuple[str, bool | None]:
    """The server's error message, and its ``retryable`` flag (None when it gave none: another server, a proxy)."""
    try:
        body = exc.read()
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            retryable = parsed.get("retryable")
            return str(parsed["error"]), retryable if isinstance(retryable, bool) else None
        return body[:200].decode(errors="replace"), None
    except Exception:  # noqa: BLE001 - the status line is still informative
        return (exc.reason if isinstance(exc.reason, str) else str(exc)), None
