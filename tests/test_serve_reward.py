"""The reward server and the reward file under bad input: every bad body or query is refused with
a reason (4xx, never 5xx), the server stays up and keeps answering good requests right, and one bad
request never fails the batch it joined. The server is the real CLI in a subprocess on loopback,
scoring with an OpenRLHF reward model (saved by OpenRLHF's own class) and a reward file."""

from __future__ import annotations

import http.client
import json
import random
import runpy
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from openrlhf_dual.launch import cpu_env, free_port
from openrlhf_dual.ppo_reward import write_reward_file
from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source

# A user's reward file that fails on some content: raises on w39, returns NaN on w38.
SAFETY = '''
import math

def reward_func(queries, prompts, labels, **kwargs):
    out = []
    for q, p in zip(queries, prompts):
        response = q[len(p):]
        if "w39" in response:
            raise ValueError("w39 is not allowed")
        out.append(math.nan if "w38" in response else float(len(response.split())) - 2.0)
    return {"rewards": out}
'''
LAM = 0.5
MAX_BODY = 1 << 16
TEMPLATE = "user : {} assistant : "  # the tiny tokenizer's chat template, as PPO's prompts carry it


@pytest.fixture(scope="module")
def prep(tiny_model_dir, tmp_path_factory) -> Path:
    """A prep directory as prepare leaves it for PPO (manifest inputs, dual.json): r from an
    OpenRLHF reward model, one safety from the reward file above."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    rm = get_llm_for_sequence_regression(str(tiny_model_dir), "reward", init_value_head=True, attn_implementation="eager")
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "rm")
    (root / "safety.py").write_text(SAFETY)
    prep = root / "prep"
    prep.mkdir()
    inputs = {"reward": f"rm:{root / 'rm'},normalize=false", "safety": [f"file:{root / 'safety.py'},sign=+1"],
              "ref_model": str(tiny_model_dir)}  # fmt: skip
    (prep / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    (prep / "dual.json").write_text(json.dumps({"lam": [LAM], "form": "model"}))
    return prep


@pytest.fixture(scope="module")
def server(prep):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_dual.cli.serve_reward", "--dual.prep_dir", str(prep), "--port", str(port),
         "--batch_size", "16", "--max_body_bytes", str(MAX_BODY)],
        env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(f"serve_reward exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("serve_reward did not start in 180 s")
            time.sleep(0.5)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer); a non-JSON answer fails the test (every refusal must say why)."""
    request = urllib.request.Request(url + "/get_reward", data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        pytest.fail(f"status {status} with a body that is not JSON: {raw[:300]!r}")


def good_requests(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(raw prompt, PPO prompt, response) triples, none touching the reward file's traps."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in ("w38", "w39")]
    out = []
    for _ in range(n):
        raw = " ".join(rng.choices(plain, k=2))
        out.append((raw, TEMPLATE.format(raw), " ".join(rng.choices(plain, k=rng.randint(1, 6)))))
    return out


def expected(prep: Path, triples) -> np.ndarray:
    """r + lambda.g of each triple from each source's own scorer, as prepare calls them."""
    inputs = json.loads((prep / "manifest.json").read_text())["inputs"]
    batch = ScoreBatch([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    r = build_scorer(parse_source(inputs["reward"])).score(batch)
    g = build_scorer(parse_source(inputs["safety"][0], "safety")).score(batch)
    return r + LAM * g


def body(queries, prompts) -> bytes:
    return json.dumps({"query": queries, "prompts": prompts, "labels": [""] * len(queries)}).encode()


def crafted(prompt: str) -> list[tuple[str, bytes, int, str]]:
    """(name, body, status, reason) of malformed requests whose refusal is known exactly."""
    deep = 30000  # 60 KB: under the body limit, far over the JSON decoder's recursion limit
    q = prompt + "w1 w2"
    return [
        ("deep array", b"[" * deep + b"]" * deep, 400, "nested too deeply"),
        ("deep in query", b'{"query": ' + b"[" * deep + b"]" * deep + b', "prompts": []}', 400, "nested too deeply"),
        ("surrogate in query", body([q + " \udcff"], [prompt]), 422, "lone surrogate"),
        ("surrogate in prompt", body([q], [prompt + "\ud800"]), 422, "lone surrogate"),
        ("invalid utf-8", b'{"query": ["\xff\xfe"], "prompts": ["x"]}', 400, "utf-8"),
        ("not an object", b"[1, 2]", 400, "JSON object"),
        ("empty body", b"", 400, "Expecting value"),
        ("NaN query", b'{"query": [NaN], "prompts": ["x"]}', 400, "list of strings"),
        ("huge integer", b'{"query": ' + b"9" * 5000 + b"}", 400, "digits"),
        ("lengths differ", body([q, q], [prompt]), 400, "2 queries but 1 prompts"),
        ("no prompt prefix", body(["other text"], [prompt]), 422, "does not start with its prompt"),
        ("source raises", body([prompt + "w1 w39"], [prompt]), 422, "w39 is not allowed"),
        ("source gives NaN", body([prompt + "w38"], [prompt]), 422, "non-finite"),
        ("over the limit", body([prompt + "w1 " * MAX_BODY], [prompt]), 413, "--max_body_bytes"),
    ]


def mutants(rng: random.Random, valid: bytes, n: int) -> list[bytes]:
    """Random bytes, random JSON values and byte-level mutations of a valid body."""
    tokens = [b"\\ud800", b"\\udcff", b'"', b"[", b"{", b"]", b",", b"null", b"\\u0000", b"\xff", b"NaN", b"1e999"]

    def value(depth: int):
        kinds = ["str", "int", "float", "none", "bool"] + (["list", "dict"] if depth < 5 else [])
        kind = rng.choice(kinds)
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        if kind == "dict":
            keys = ["query", "prompts", "labels", "x"]
            return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}
        return {"str": lambda: "".join(rng.choices(WORDS + [":", " ", "\udcff", "é"], k=rng.randint(0, 5))),
                "int": lambda: rng.randint(-10**6, 10**6), "float": rng.random, "none": lambda: None,
                "bool": lambda: rng.random() < 0.5}[kind]()  # fmt: skip

    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        elif kind == 1:
            out.append(json.dumps(value(0)).encode())
        else:
            b = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(b) + 1)
                op = rng.random()
                if op < 0.4:
                    b[at:at] = rng.choice(tokens)
                elif op < 0.7 and len(b):
                    b[at : at + rng.randint(1, 8)] = b""
                elif len(b):
                    b[min(at, len(b) - 1)] = rng.getrandbits(8)
            out.append(bytes(b))
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("name", [c[0] for c in crafted("p")])
def test_malformed_request_is_refused_with_its_reason(server, name):
    url, proc = server
    _, req, status, reason = next(c for c in crafted(TEMPLATE.format("w1 w2")) if c[0] == name)
    got, answer = post(url, req)
    assert (got, reason.lower() in answer.get("error", "").lower()) == (status, True), answer
    assert proc.poll() is None


def test_oversized_chunked_body_is_refused_before_it_is_read_whole(server):
    """A chunked body of up to 1024 x the limit, sent 4 KiB at a time over a raw socket that stops
    sending once the answer arrives (urllib would write it all first and could die on a broken pipe
    when the server closes early): 413 with the reason, before the body was sent whole."""
    url, _ = server
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    total, sent = 1024 * MAX_BODY, 0
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % host.encode())  # fmt: skip
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += 4096
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed; its answer is still readable
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        status, reply = answer.status, json.loads(answer.read())
    assert status == 413 and "--max_body_bytes" in reply["error"]
    assert sent < total, "the server read the whole oversized body before refusing it"


def test_fuzz_no_5xx_and_every_good_request_between_answered_right(server, prep):
    """Bounded: 480 bad bodies (crafted, random, mutated) and 96 good ones, shuffled, 16 in flight,
    while /health is polled; then the same bad bodies twice more, to see the server's memory."""
    url, proc = server
    rng = random.Random(0)
    good = good_requests(96, seed=1)
    want = expected(prep, good)
    prompt = good[0][1]
    bad = [c[1] for c in crafted(prompt)] * 4 + mutants(rng, body([prompt + good[0][2]], [prompt]), 424)
    jobs = [("good", i, body([p + r], [p])) for i, (_, p, r) in enumerate(good)] + [("bad", i, b) for i, b in enumerate(bad)]
    rng.shuffle(jobs)
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.monotonic()
            with urllib.request.urlopen(url + "/health", timeout=30) as r:
                health.append((r.status, time.monotonic() - t))
            time.sleep(0.2)

    poller = threading.Thread(target=poll)
    t0 = time.monotonic()
    poller.start()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: post(url, job[2]), jobs))
    fuzz_s = time.monotonic() - t0
    rss_after_one = rss_kb(proc.pid)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda b: post(url, b), bad * 2))
    stop.set()
    poller.join()
    growth_mb = (rss_kb(proc.pid) - rss_after_one) / 1024

    statuses = [s for s, _ in answers]
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"fuzz: {len(bad)} bad + {len(good)} good requests in {fuzz_s:.1f} s, statuses {counts}; "
          f"/health {len(health)} polls, slowest {max(h[1] for h in health):.2f} s; "
          f"RSS after {2 * len(bad)} more bad requests: {growth_mb:+.1f} MB")  # fmt: skip
    assert all(s < 500 for s in statuses), counts
    assert all("error" in a for s, a in answers if s != 200)
    got = np.full(len(good), np.nan)
    for (kind, i, _), (status, answer) in zip(jobs, answers):
        if kind == "good":
            assert status == 200, answer
            got[i] = answer["rewards"][0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(np.round(want, 6))) > 10  # distinct answers: a mix-up would show
    assert all(s == 200 for s, _ in health) and max(h[1] for h in health) < 10
    assert proc.poll() is None
    assert growth_mb < 50, f"server memory grew {growth_mb:.1f} MB over {2 * len(bad)} bad requests"


def test_reward_file_names_the_query_it_cannot_score(prep):
    """The reward-file path (`--reward.remote_url ppo_reward.py`) raises a clear error naming the
    query, not a tokenizer's traceback; a good query after it is still scored."""
    reward_func = runpy.run_path(str(write_reward_file(prep)))["reward_func"]
    prompt = TEMPLATE.format("w1 w2")
    with pytest.raises(ValueError, match=r"query 0 .*lone surrogate"):
        reward_func([prompt + "w3 \udcff"], [prompt], [""])
    with pytest.raises(ValueError, match=r"query 1 .*w39 is not allowed"):
        reward_func([prompt + "w3", prompt + "w39"], [prompt, prompt], ["", ""])
    out = reward_func([prompt + "w3 w4"], [prompt], [""])
    np.testing.assert_allclose(out["rewards"].numpy(), expected(prep, [("w1 w2", prompt, "w3 w4")]), atol=1e-5)


def test_one_bad_request_never_fails_the_batch_it_joined():
    """MicroBatcher: 8 concurrent callers gathered into one batch, one of them poisoned; the batch
    function refuses any batch holding it. The 7 others get their rows, the poisoned one its error."""
    from openrlhf_dual.batching import MicroBatcher

    calls = []

    def fn(xs):
        calls.append(list(xs))
        if "poison" in xs:
            raise ValueError("poison")
        return np.array([float(len(x)) for x in xs])

    batcher = MicroBatcher(fn, max_batch=64, max_wait_s=0.5)
    texts = ["a" * i for i in range(1, 8)] + ["poison"]
    barrier = threading.Barrier(len(texts))

    def call(x):
        barrier.wait()
        try:
            return batcher([x])[0]
        except ValueError as err:
            return str(err)

    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(call, texts))
    assert len(calls[0]) == len(texts)  # they did share one batch
    assert got == [float(i) for i in range(1, 8)] + ["poison"]


def test_server_states_what_it_scores_with_for_prepare_to_record(server, prep):
    """GET /identity: lambda and what the reference model and sources point at; a `remote:` source
    pointing at this server takes that as its identity (openrlhf_dual.scoring.identity)."""
    from openrlhf_dual.cli.serve_reward import served_identity
    from openrlhf_dual.scoring.identity import file_identity, source_identity

    url, _ = server
    with urllib.request.urlopen(url + "/identity", timeout=30) as r:
        stated = json.loads(r.read())
    assert stated == json.loads(json.dumps(served_identity(prep, [LAM])))
    identity = source_identity(f"remote:{url}/get_reward")
    assert identity["stated.lambda.0"] == json.dumps(LAM)
    assert identity["stated.sources.1.identity.sha256"] == json.dumps(file_identity(prep.parent / "safety.py")["sha256"])
