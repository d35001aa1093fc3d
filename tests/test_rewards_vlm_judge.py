"""VLMJudgeReward against a local OpenAI-compatible server: scores, batching, garbage answers,
slow responses, a server that dies mid-run, and the error naming the URL when it is down."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from marble_lightning.rewards.base import MultiReward
from marble_lightning.rewards.vlm_judge import VLMJudgeReward, parse_score


class _Judge(BaseHTTPRequestHandler):
    """Answers with the number in the prompt text after 'score=' ('garbage' -> not JSON,
    'words' -> no number, 'slow' -> sleeps past the client's timeout, 'die' -> closes)."""

    calls = 0

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        text = content[1]["text"]
        if "slow" in text:
            time.sleep(1.0)
        if "die" in text:
            self.close_connection = True
            return
        if "garbage" in text:
            payload = b"<html>oops"
        else:
            answer = (
                "I think it is good" if "words" in text else text.split("score=")[1].split('"')[0]
            )
            payload = json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": answer}}]}
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_parse_score() -> None:
    assert parse_score("7", 10) == 0.7 and parse_score("Score: 8.5/10", 10) == 0.85
    assert parse_score("none", 10) is None and parse_score("11", 10) is None
    assert parse_score(None, 10) is None


def test_scores_and_malformed_answers_mask_only_that_image(server) -> None:
    judge = VLMJudgeReward(_url(server), timeout=0.5, retries=1, backoff=0.01, concurrency=3)
    prompts = ["score=7", "score=garbage", "score=words", "score=10"]
    batch = MultiReward([judge])(IMAGES, prompts)
    assert batch.mask[:, 0].tolist() == [True, False, False, True]
    assert batch.values[:, 0].tolist() == pytest.approx([0.7, 0.0, 0.0, 1.0])


def test_slow_server_times_out_with_retries_and_masks(server) -> None:
    _Judge.calls = 0
    judge = VLMJudgeReward(_url(server), timeout=0.2, retries=2, backoff=0.01)
    batch = MultiReward([judge])(IMAGES[:2], ["score=3", "slow score=5"])
    assert batch.mask[:, 0].tolist() == [True, False]
    assert batch.values[0, 0].item() == pytest.approx(0.3)
    assert _Judge.calls == 1 + 3  # the slow image was tried 1 + retries times


def test_server_dying_mid_run(server) -> None:
    judge = VLMJudgeReward(_url(server), timeout=0.5, retries=1, backoff=0.01)
    first = MultiReward([judge])(IMAGES[:2], ["score=4", "die"])
    assert first.mask[:, 0].tolist() == [True, False]  # a dropped connection masks that image
    url = _url(server)
    server.shutdown()
    server.server_close()
    with pytest.raises(
        Exception, match=url.replace(".", r"\.") + "/chat/completions cannot be reached"
    ):
        MultiReward([judge])(IMAGES[:2], ["score=4", "score=5"], step=3)


def test_down_server_error_names_the_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    judge = VLMJudgeReward(url, timeout=0.5, retries=1, backoff=0.01)
    with pytest.raises(ConnectionError, match="cannot be reached"):
        judge(IMAGES[:1], ["score=1"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="url"):
        VLMJudgeReward("localhost:8000")
    with pytest.raises(ValueError, match="max_score"):
        VLMJudgeReward("http://x/v1", max_score=0)
