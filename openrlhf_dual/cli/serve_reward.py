"""Serve r + lambda*.g of a prep directory with OpenRLHF's `serve_rm` protocol, for PPO:

    python -m openrlhf_dual.cli.serve_reward --dual.prep_dir prep/ --port 5000
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url http://127.0.0.1:5000/get_reward

POST /get_reward {"query": [str], "prompts": [str], "labels": [...]} -> {"rewards": [float],
"scores": [float], "extra_logs": {"dual_reward": [float], "dual_safety_<j>": [float]}}. GET /health
-> {"lambda"}; GET /identity -> what it scores with (`served_identity`). Concurrent
requests are scored in shared batches; when a batch fails, each of its requests is scored alone, so
a bad request fails only itself. Every refusal is JSON {"error": reason}: 413 for a body over
--max_body_bytes, 400 for a body that is not a JSON object of that shape, 422 for a request that
cannot be scored for its own content (a lone surrogate, a query not starting with its prompt, a
source failing on it or a non-finite total), 503 only for the server's own faults (out of memory).
Binds to loopback unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.concurrency import run_in_threadpool

from openrlhf_dual.ppo_reward import CombinedReward, QueryError

MAX_BODY_BYTES = 16 << 20


def _columns(data) -> tuple[list[str], list[str]]:
    """(queries, prompts) of a request body, or ValueError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object with 'query' and 'prompts' lists")
    queries, prompts = data.get("query"), data.get("prompts")
    for name, value in (("query", queries), ("prompts", prompts)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"'{name}' must be a list of strings (the prompt is needed to find the response)")
    if len(queries) != len(prompts):
        raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
    return queries, prompts


def _error(status: int, reason: str) -> JSONResponse:
    """{"error": reason}; a reason quoting the request's text may hold lone surrogates, escaped here."""
    return JSONResponse({"error": reason.encode("utf-8", "backslashreplace").decode()}, status_code=status)


class _TooLarge(Exception):
    pass


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes before it is read whole (Content-Length or chunked)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[list[str], list[str]]:
    try:
        return _columns(json.loads(body))
    except RecursionError:
        raise ValueError("body is not JSON of the expected shape: nested too deeply") from None


def served_identity(prep_dir: str | Path, lam: list[float]) -> dict:
    """What this server scores with, for GET /identity: lambda and what the reference model (its
    tokenizer splits queries) and each source point at (openrlhf_dual.scoring.identity)."""
    from openrlhf_dual.scoring.identity import setup_identity

    inputs = json.loads((Path(prep_dir) / "manifest.json").read_text())["inputs"]
    return {"lambda": lam, **setup_identity(inputs["ref_model"], inputs["reward"], inputs["safety"])}


def build_app(reward: CombinedReward, max_body_bytes: int = MAX_BODY_BYTES, identity: dict | None = None):
    """The FastAPI app: POST /get_reward, GET /health, GET /identity (`served_identity`; prepare
    records it for a `remote:` source pointing here, and notices when it changes)."""
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        try:
            body = await _body(request, max_body_bytes)
        except _TooLarge:
            return _error(413, f"body larger than {max_body_bytes} bytes (--max_body_bytes)")
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log
            return _error(400, "client disconnected before the body arrived")
        try:  # parsed and scored in worker threads: /health and other requests keep being served
            queries, prompts = await run_in_threadpool(_parse, body)
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _error(400, str(err))
        try:  # concurrent requests share batches; a failing one is retried alone
            scores = await run_in_threadpool(reward.score, queries, prompts)
        except QueryError as err:  # this request's content: not Unicode, no prompt prefix, a source failed on it
            return _error(422, str(err))
        except Exception as err:  # the server's fault (e.g. out of memory): say so, log it, stay up
            reason = f"the server could not score this request now: {type(err).__name__}: {err}"
            logging.getLogger("uvicorn.error").warning(reason)
            return _error(503, reason)
        return JSONResponse(reward.response(scores))

    @app.get("/health")
    async def health() -> dict:
        return {"lambda": reward.lam.tolist()}

    @app.get("/identity")
    async def get_identity() -> dict:
        return identity or {}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dual.prep_dir", dest="prep_dir", required=True, help="directory written by openrlhf_dual.cli.prepare")
    p.add_argument("--dual.lambda", dest="lam", type=float, nargs="+", default=None, help="override lambda*")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--batch_size", type=int, default=64, help="most queries scored together")
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413")
    a = p.parse_args(argv)
    import uvicorn

    reward = CombinedReward(a.prep_dir, a.lam, device=a.device, max_batch=a.batch_size)
    identity = served_identity(a.prep_dir, reward.lam.tolist())
    uvicorn.run(build_app(reward, a.max_body_bytes, identity), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
