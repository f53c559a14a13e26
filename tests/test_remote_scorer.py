"""RemoteScorer against a real HTTP server on loopback that misbehaves on cue: batching and order,
retries after dropped connections and timeouts, HTTP errors (no retry), wrong-length replies."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source
from openrlhf_dual.scoring.remote import RemoteScorer


def reward_of(query: str) -> float:
    return float(len(query.split())) + 0.25 * query.count("good")


class Server:
    """serve_rm's API, POST {"query": [str]} -> {"rewards": [float]}; `script` says what the next
    requests get: "ok", "drop" (close without answering), "slow" (answer after 1.5 s), "short"
    (one reward too few), "nan", or an HTTP status code."""

    def __init__(self):
        self.script: list = []
        self.bodies: list[list[str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
                owner.bodies.append(queries)
                action = owner.script.pop(0) if owner.script else "ok"
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "slow":
                    time.sleep(1.5)
                if isinstance(action, int):
                    self.send_response(action)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scorer is down"}')
                    return
                rewards = [reward_of(q) for q in queries]
                rewards = rewards[:-1] if action == "short" else rewards
                rewards = [float("nan")] * len(rewards) if action == "nan" else rewards
                body = json.dumps({"rewards": rewards}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/get_reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


BATCH = ScoreBatch(
    raw_prompts=[f"q{i}" for i in range(7)],
    prompts=[f"user : w{i} assistant : " for i in range(7)],
    responses=["good", "bad bad", "", "good good good", "w1 w2", "kind", "good rude"],
)


def test_batches_go_in_order_and_scores_come_back_in_order(server):
    got = RemoteScorer(server.url, batch_size=3).score(BATCH)
    assert got.dtype == np.float64 and got.tolist() == [reward_of(q) for q in BATCH.queries]
    assert server.bodies == [BATCH.queries[0:3], BATCH.queries[3:6], BATCH.queries[6:7]]  # prompt + response


def test_dropped_connections_and_timeouts_are_retried(server):
    server.script = ["drop", "slow", "ok"]
    t = time.perf_counter()
    got = RemoteScorer(server.url, batch_size=8, timeout=0.5, retries=3).score(BATCH)
    assert got.tolist() == [reward_of(q) for q in BATCH.queries]
    assert len(server.bodies) == 3 and all(b == BATCH.queries for b in server.bodies)
    assert time.perf_counter() - t >= 0.5 + 1.0  # backed off 0.5 s, then 1 s


def test_gives_up_after_its_retries(server):
    server.script = ["drop", "drop", "drop"]
    with pytest.raises(RuntimeError, match=r"unreachable after 3 tries"):
        RemoteScorer(server.url, retries=2).score(BATCH)
    assert len(server.bodies) == 3


def test_nothing_listening_is_unreachable():
    s = Server()
    url = s.url
    s.close()  # the port is free again: connection refused
    with pytest.raises(RuntimeError, match=rf"{url} unreachable after 2 tries"):
        RemoteScorer(url, retries=1).score(BATCH)


def test_an_http_error_is_reported_with_its_body_and_not_retried(server):
    server.script = [503]
    with pytest.raises(RuntimeError, match=r"answered 503: b'\{\"error\": \"scorer is down\"\}'"):
        RemoteScorer(server.url, retries=3).score(BATCH)
    assert len(server.bodies) == 1


def test_a_reply_of_the_wrong_length_is_refused(server):
    server.script = ["ok", "short"]
    with pytest.raises(RuntimeError, match="returned 2 rewards for 3 queries"):
        RemoteScorer(server.url, batch_size=4).score(BATCH)


def test_remote_source_applies_its_sign_and_refuses_non_finite_scores(server):
    scorer = build_scorer(parse_source(f"remote:{server.url},batch_size=2,timeout=5,sign=-1", "safety"))
    assert scorer.score(BATCH).tolist() == [-reward_of(q) for q in BATCH.queries]
    server.script = ["nan"]
    with pytest.raises(ValueError, match="2 non-finite scores"):
        scorer.score(BATCH)
