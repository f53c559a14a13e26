"""Serve r + lambda*.g of a prep directory with OpenRLHF's `serve_rm` protocol, for PPO:

    python -m openrlhf_dual.cli.serve_reward --dual.prep_dir prep/ --port 5000
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url http://127.0.0.1:5000/get_reward

POST /get_reward {"query": [str], "prompts": [str], "labels": [...]} -> {"rewards": [float],
"scores": [float], "extra_logs": {"dual_reward": [float], "dual_safety_<j>": [float]}}. Concurrent
requests are scored in shared batches; a malformed request gets a 400 with the reason. Binds to
loopback unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from openrlhf_dual.ppo_reward import CombinedReward


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


def build_app(reward: CombinedReward):
    """The FastAPI app: POST /get_reward, GET /health."""
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        try:
            queries, prompts = _columns(json.loads(await request.body()))
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            return JSONResponse({"error": str(err)}, status_code=400)
        try:  # scored in a worker thread, where concurrent requests share batches
            scores = await run_in_threadpool(reward.score, queries, prompts)
        except ValueError as err:  # e.g. a query that does not start with its prompt
            return JSONResponse({"error": str(err)}, status_code=422)
        return JSONResponse(reward.response(scores))

    @app.get("/health")
    async def health() -> dict:
        return {"lambda": reward.lam.tolist()}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dual.prep_dir", dest="prep_dir", required=True, help="directory written by openrlhf_dual.cli.prepare")
    p.add_argument("--dual.lambda", dest="lam", type=float, nargs="+", default=None, help="override lambda*")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--batch_size", type=int, default=64, help="most queries scored together")
    a = p.parse_args(argv)
    import uvicorn

    reward = CombinedReward(a.prep_dir, a.lam, device=a.device, max_batch=a.batch_size)
    uvicorn.run(build_app(reward), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
