"""One-shot constrained PPO: the reward r + lambda*.g of a prep directory, for OpenRLHF's PPO.

`train_ppo_ray` takes rewards through `--reward.remote_url`, either a Python file with
`reward_func(queries, prompts, labels)` or a `serve_rm`-style server. Both are built here on one
`CombinedReward`: the prep directory's reward source and m safety sources (models loaded once per
process, GPU when present), batched across concurrent calls, and lambda* from its dual.json. r and
each g_j go back separately in `extra_logs`, so helpfulness and safety are logged as they move.

Text: PPO sends query = decode(prompt_ids + response_ids, skip_special_tokens=False). The scores
lambda* was solved on were of the response decoded alone with special tokens skipped
(openrlhf_dual.sampling), so `split_response` recovers exactly that text before scoring. Scorers
with their own conversation template (Safe-RLHF, judges) need the user's raw text: known for the
prompts prepare saw, and recovered for any other by stripping the template prepare applied
(`PromptTemplate`), so it is never wrapped twice.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import read_jsonl, write_bytes_atomic
from openrlhf_dual.batching import MicroBatcher
from openrlhf_dual.labels import combined_reward

REWARD_FILE = "ppo_reward.py"


class QueryError(ValueError):
    """A query that cannot be scored for its own content; the message names it."""


def _name(i: int, query: str) -> str:
    return f"query {i} ({query[:60]!r}{'...' if len(query) > 60 else ''})"


def _not_unicode(text: str) -> int | None:
    """Index of the first lone surrogate (a str JSON or Python can hold but UTF-8 cannot), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return err.start


def split_response(query: str, prompt: str, tokenizer) -> str:
    """The response inside a PPO query, as prepare's sampler wrote it (openrlhf_dual.sampling.
    response_text): the query's ids after the prompt's ids, read as text after the prompt, special
    tokens (EOS, padding) skipped. When re-tokenising the query does not reproduce the prompt's ids,
    the text after the decoded prompt, re-encoded and decoded with special tokens skipped."""
    from openrlhf_dual.sampling import response_text

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] == prompt_ids:
        return response_text(tokenizer, prompt, prompt_ids, ids[len(prompt_ids) :])
    decoded_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    for head in (decoded_prompt, prompt):
        if query.startswith(head):
            tail = query[len(head) :]
            return tokenizer.decode(tokenizer(tail, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    raise ValueError(f"query does not start with its prompt: {query[:80]!r} vs {prompt[:80]!r}")


class PromptTemplate:
    """The text around the user's message in a formatted prompt, as prepare formatted it: its
    --data.input_template, or the reference tokenizer's chat template (one user turn, generation
    prompt), or nothing. `raw(prompt)` strips it, or raises when the prompt does not carry it."""

    MARK = "\x00openrlhf-dual-user-text\x00"

    def __init__(self, input_template: str | None, chat_tokenizer=None):
        if chat_tokenizer is not None:
            rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": self.MARK}], tokenize=False,
                                                          add_generation_prompt=True)  # fmt: skip
        else:
            rendered = input_template.format(self.MARK) if input_template else self.MARK
        self.prefix, _, self.suffix = rendered.partition(self.MARK)

    def raw(self, prompt: str) -> str:
        if not (prompt.startswith(self.prefix) and prompt.endswith(self.suffix)
                and len(prompt) >= len(self.prefix) + len(self.suffix)):  # fmt: skip
            raise ValueError(
                f"PPO prompt {prompt[:80]!r} does not carry the template prepare formatted its prompts with "
                f"({self.prefix[:40]!r} ... {self.suffix[-40:]!r}): give train_ppo_ray the same --data.input_template "
                "or --data.apply_chat_template as prepare, and single-turn prompts"
            )
        return prompt[len(self.prefix) : len(prompt) - len(self.suffix)]


def _check_sources(prep_dir: Path, manifest: dict) -> None:
    """Refuse sources that changed since prepare scored with them (openrlhf_dual.scoring.identity):
    lambda* was solved on their old scores. A prep directory from before identities were recorded
    is accepted as it is."""
    from openrlhf_dual.scoring.identity import changes, source_identity

    for j, recorded in enumerate(manifest.get("identity", {}).get("sources", [])):
        what = changes(recorded["identity"], source_identity(recorded["spec"], "reward" if j == 0 else "safety"))
        if what:
            raise ValueError(
                f"source {recorded['spec']} changed since prepare scored with it ({'; '.join(what)}): lambda* in "
                f"{prep_dir} was solved on the old scores; restore the source, or rerun prepare with --dual.rescore"
            )


class CombinedReward:
    """r + lambda . g for PPO queries, from a prep directory's sources and dual.json.

    `score(queries, prompts)` -> float64 [n, 2 + m]: total r + lambda.g, then r, then g_1..g_m
    (signs applied, the units lambda* was solved in). Thread-safe; concurrent calls share batches."""

    def __init__(self, prep_dir: str | Path, lam=None, device: str | None = None, max_batch: int = 64):
        import torch
        from transformers import AutoTokenizer

        from openrlhf_dual.scoring import build_scorer, parse_source

        inputs, self.lam = self.check_prep_dir(prep_dir, lam)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        specs = [parse_source(inputs["reward"], "reward")] + [parse_source(s, "safety") for s in inputs["safety"]]
        self.scorers = [build_scorer(spec, device=device) for spec in specs]
        self.tokenizer = AutoTokenizer.from_pretrained(inputs["ref_model"], trust_remote_code=False)
        prompts = Path(prep_dir) / "prompts.jsonl"
        self.raw = {r["prompt"]: r["raw"] for r in read_jsonl(prompts)} if prompts.exists() else {}
        chat = self.tokenizer if inputs.get("apply_chat_template") else None
        self.template = PromptTemplate(inputs.get("input_template"), chat)
        self._batcher = MicroBatcher(self._score_batch, max_batch=max_batch)

    @staticmethod
    def check_prep_dir(prep_dir: str | Path, lam=None) -> tuple[dict, np.ndarray]:
        """(prepare's inputs, lambda [m]) of a prep directory; lam overrides dual.json's lambda*.
        Raises with the reason when the directory or lambda cannot make the reward."""
        prep_dir = Path(prep_dir)
        manifest, dual = prep_dir / "manifest.json", prep_dir / "dual.json"
        for path in (manifest, dual):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: run `python -m openrlhf_dual.cli.prepare` first")
        manifest = json.loads(manifest.read_text())
        inputs, solution = manifest["inputs"], json.loads(dual.read_text())
        if solution.get("form") == "margin":
            raise ValueError(f"{prep_dir} is a PeCAN prep directory (implicit rewards of policies): the PPO reward "
                             "needs a MoCAN prep directory, whose sources score text")  # fmt: skip
        lam = solution["lam"] if lam is None else lam
        if lam is None or any(v is None for v in lam):
            raise ValueError(f"{dual} has no finite lambda* (infeasible threshold?); pass --dual.lambda to choose one")
        lam = np.asarray(lam, dtype=np.float64).reshape(-1)
        if len(lam) != len(inputs["safety"]) or not np.all(np.isfinite(lam)) or np.any(lam < 0):
            raise ValueError(f"lambda {lam.tolist()} must be finite, >= 0, one per safety source {inputs['safety']}")
        _check_sources(prep_dir, manifest)
        return inputs, lam

    @property
    def m(self) -> int:
        return len(self.lam)

    def _score_batch(self, raw_prompts: list[str], prompts: list[str], responses: list[str]) -> np.ndarray:
        from openrlhf_dual.scoring import ScoreBatch

        cols = np.stack([s.score(ScoreBatch(raw_prompts, prompts, responses)) for s in self.scorers], axis=1)
        return np.concatenate([combined_reward(cols[:, 0], cols[:, 1:], self.lam)[:, None], cols], axis=1)

    def score(self, queries: list[str], prompts: list[str]) -> np.ndarray:
        """Checked per call, then scored in a shared batch. A query that cannot be scored for its
        own content (not valid Unicode, not starting with its prompt, failing a source, a
        non-finite total) raises QueryError naming it; other calls in its batch are unaffected."""
        if not all(isinstance(x, str) for x in [*queries, *prompts]):
            raise TypeError("queries and prompts must be lists of strings")
        if len(queries) != len(prompts):
            raise QueryError(f"{len(queries)} queries but {len(prompts)} prompts")
        if not queries:
            return np.zeros((0, 2 + self.m))
        for i, (q, p) in enumerate(zip(queries, prompts)):
            for name, text in (("query", q), ("prompt", p)):
                bad = _not_unicode(text)
                if bad is not None:
                    raise QueryError(f"{_name(i, q)}: its {name} holds {text[bad]!r} at character {bad}, a lone "
                                     "surrogate (not valid Unicode), which no tokenizer can encode")  # fmt: skip
        try:
            out = self._scored(queries, prompts)
        except QueryError:
            for i in range(len(queries) if len(queries) > 1 else 0):  # find the query that failed
                self._scored(queries[i : i + 1], prompts[i : i + 1], first=i)
            raise
        bad = np.flatnonzero(~np.isfinite(out[:, 0]))
        if bad.size:
            raise QueryError(f"{_name(bad[0], queries[bad[0]])}: r + lambda.g is not finite ({out[bad[0]].tolist()})")
        return out

    def _scored(self, queries: list[str], prompts: list[str], first: int = 0) -> np.ndarray:
        """Scores [n, 2 + m]; a content failure raises QueryError (resource errors propagate)."""
        import torch

        try:
            responses = [split_response(q, p, self.tokenizer) for q, p in zip(queries, prompts)]
            # Scorers with their own conversation template (Safe-RLHF) need the user's text: known for
            # the prompts prepare saw, recovered by stripping prepare's template from the others.
            raw = [self.raw[p] if p in self.raw else self.template.raw(p) for p in prompts]
            return self._batcher(raw, list(prompts), responses)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as err:
            head = _name(first, queries[0]) if len(queries) == 1 else f"one of queries {first}..{first + len(queries) - 1}"
            raise QueryError(f"{head} cannot be scored: {type(err).__name__}: {err}") from err

    def response(self, scores: np.ndarray) -> dict[str, list]:
        """The reward JSON of OpenRLHF (serve_rm's keys) for scores [n, 2 + m]."""
        logs = {"dual_reward": scores[:, 1].tolist(), **{f"dual_safety_{j}": scores[:, 2 + j].tolist() for j in range(self.m)}}
        return {"rewards": scores[:, 0].tolist(), "scores": scores[:, 0].tolist(), "extra_logs": logs}


_LOADED: dict = {}
_LOCK = threading.Lock()


def reward_func_for(prep_dir: str | Path, lam=None):
    """`reward_func(queries, prompts, labels, **kwargs)` for `--reward.remote_url FILE.py`. The models
    load on the first call and are shared by every caller in the process. Returns tensors, as
    OpenRLHF's example reward functions do."""
    key = (str(Path(prep_dir).resolve()), None if lam is None else tuple(float(v) for v in lam))

    def reward_func(queries, prompts, labels=None, **kwargs):
        import torch

        with _LOCK:
            if key not in _LOADED:
                _LOADED[key] = CombinedReward(key[0], key[1])
        scorer = _LOADED[key]
        out = scorer.response(scorer.score(list(queries), list(prompts)))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        return {
            "rewards": as_tensor(out["rewards"]),
            "scores": as_tensor(out["scores"]),
            "extra_logs": {k: as_tensor(v) for k, v in out["extra_logs"].items()},
        }

    return reward_func


def write_reward_file(prep_dir: str | Path, lam=None) -> Path:
    """Write the reward file for `--reward.remote_url` into the prep directory (atomically): with
    lambda* of dual.json it is `ppo_reward.py` and finds its directory by its own location; with a
    chosen lambda it is `ppo_reward_lambda_<values>.py`."""
    prep_dir = Path(prep_dir)
    if lam is None:
        path, args = prep_dir / REWARD_FILE, "Path(__file__).resolve().parent"
    else:
        lam = [float(v) for v in lam]
        path = prep_dir / f"ppo_reward_lambda_{'_'.join(f'{v:g}' for v in lam)}.py"
        args = f"Path(__file__).resolve().parent, lam={lam!r}"
    text = (
        '"""r + lambda*.g of this prep directory for `--reward.remote_url` (written by openrlhf_dual)."""\n'
        "from pathlib import Path\n\nfrom openrlhf_dual.ppo_reward import reward_func_for\n\n"
        f"reward_func = reward_func_for({args})\n"
    )
    write_bytes_atomic(path, text.encode())
    return path
