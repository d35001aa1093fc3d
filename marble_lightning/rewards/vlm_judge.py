"""A VLM-judge reward (UnifiedReward-style) through an OpenAI-compatible chat endpoint.

Each image goes, with its prompt, to ``POST <url>/chat/completions`` (what vLLM and sglang
serve) as a base64 PNG ``image_url`` part plus a text question; the first number in the answer,
divided by ``max_score``, is the reward. Requests of a batch run concurrently (``concurrency``),
each with a ``timeout`` and up to ``retries`` retries with exponential backoff.

Failure handling: an answer without a number in ``[0, max_score]`` (or an HTTP error, or a
timeout after the retries) masks that image only (``last_valid``, read by
:class:`~marble_lightning.rewards.base.MultiReward`): the step goes on without it. When no image of
the batch got through because the server cannot be reached, a ``ConnectionError`` names the URL.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.rewards._loading import to_uint8_hwc
from marble_lightning.rewards.base import RewardModel

__all__ = ["VLMJudgeReward", "parse_score"]

DEFAULT_QUESTION = (
    'You are judging a generated image for the prompt: "{prompt}". Rate how well the image '
    "matches the prompt and how good it looks, from 0 to {max_score}. Answer with the number only."
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_score(answer: object, max_score: float) -> float | None:
    """The first number of ``answer`` divided by ``max_score``, or ``None`` if malformed/out of
    range."""
    if not isinstance(answer, str):
        return None
    match = _NUMBER.search(answer)
    if match is None:
        return None
    value = float(match.group())
    if not 0.0 <= value <= max_score:
        return None
    return value / max_score


class _Unreachable(Exception):
    pass


class VLMJudgeReward(RewardModel):
    """Scores from a VLM judge served behind an OpenAI-compatible HTTP API.

    Args:
        url: server base URL (``http://host:port/v1``) or the full ``.../chat/completions`` URL.
        model: the served model's name.
        question: text sent with each image; ``{prompt}`` and ``{max_score}`` are filled in.
        max_score: top of the judge's scale (scores are divided by it).
        timeout: seconds per request.
        retries: retries per image after the first attempt (timeouts, 5xx, connection errors).
        backoff: first retry delay in seconds (doubled each retry).
        concurrency: requests in flight at once.
        api_key_env: environment variable holding a bearer token (``None``: no header).
        max_tokens: answer length limit.
        name: reward name.

    Attributes:
        last_valid: ``[B]`` bool of the last call: False where the image got no valid score.
    """

    name = "vlm_judge"

    def __init__(
        self,
        url: str,
        model: str = "judge",
        question: str = DEFAULT_QUESTION,
        max_score: float = 10.0,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        api_key_env: str | None = None,
        max_tokens: int = 16,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"`url` should be an http(s) URL, got {url!r}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = str(model)
        self.question = str(question)
        self.max_score = check_float("max_score", max_score, minimum=0.0, strict=True)
        self.timeout = check_float("timeout", timeout, minimum=0.0, strict=True)
        self.retries = check_int("retries", retries, 0)
        self.backoff = check_float("backoff", backoff, minimum=0.0)
        self.concurrency = check_int("concurrency", concurrency, 1)
        self.max_tokens = check_int("max_tokens", max_tokens, 1)
        self.api_key_env = api_key_env
        self.last_valid: Tensor | None = None

    def _payload(self, image_hwc, prompt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image_hwc).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        text = self.question.format(prompt=prompt, max_score=f"{self.max_score:g}")
        body = {
            "model": self.model,
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": text},
            ]}],
        }  # fmt: skip
        return json.dumps(body).encode("utf-8")

    def _ask(self, payload: bytes) -> float | None:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        unreachable = False
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read().decode("utf-8", errors="replace"))
            except urllib.error.HTTPError as err:
                unreachable = False
                if err.code < 500 and err.code != 429:
                    return None  # a client error will not heal by retrying
                continue
            except (urllib.error.URLError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                unreachable = not isinstance(reason, (TimeoutError, socket.timeout))
                continue
            except TimeoutError:
                unreachable = False
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None  # garbage body: mask the image
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                return None
            return parse_score(content, self.max_score)
        if unreachable:
            raise _Unreachable
        return None

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self.last_valid = None
        payloads = [self._payload(a, p) for a, p in zip(to_uint8_hwc(images), prompts)]

        def ask(payload: bytes) -> tuple[float | None, bool]:
            try:
                return self._ask(payload), False
            except _Unreachable:
                return None, True

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(payloads))) as pool:
            results = list(pool.map(ask, payloads))
        if results and all(down for _, down in results):
            raise ConnectionError(
                f"VLM judge reward {self.name!r}: the server at {self.url} cannot be reached "
                f"(after {self.retries} retries per image); is it running?"
            )
        values = [0.0 if v is None else v for v, _ in results]
        self.last_valid = torch.tensor([v is not None for v, _ in results], dtype=torch.bool)
        return torch.tensor(values, dtype=torch.float32, device=images.device)
