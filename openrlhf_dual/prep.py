"""The dual-preprocessing step: prompts -> K samples of pi_ref -> scores -> lambda* -> pairs.

Writes a prep directory, the contract between stages:

    manifest.json         inputs that fix samples and scores, what the reference model and each source
                          point at (openrlhf_dual.scoring.identity), versions, records, stage status
    prompts.jsonl         {"id", "raw", "prompt"}: raw user prompt and the text pi_ref was given
    samples/shard-*.jsonl per prompt: K responses {"text", "token_ids", "finished"}
    scores/shard-*.npy    float64 [n, K, 1 + m]: reward, then each safety (signs applied); PeCAN:
                          implicit rewards log pi_r/pi_ref, then each log pi_g/pi_ref (nats)
    dual.json             the dual solution (lambda*, predictions, standard errors, diagnostics)
    frontier.json/.png    the one-constraint trade-off curve (m == 1)
    pair_scores.npy       float64 [n, 2, 1 + m]: scores of a preference dataset's pairs, if used
    pairs.jsonl           training pairs with raw scores (openrlhf_dual.pairs)
    ppo_reward.py         r + lambda*.g for train_ppo_ray's --reward.remote_url (openrlhf_dual.ppo_reward)

Work is sharded by prompts; a shard is finished when its scores file exists (files are written
atomically), so a rerun resumes from the finished shards and, sampling being seeded per prompt,
ends with the same bytes as an uninterrupted run. Thresholds and beta are not part of the
fingerprint: changing them re-solves the dual without re-sampling. A source that changed since it
scored (a reward file edited, another checkpoint at the same path) is refused on resume; with
rescore the samples are kept and every score is made again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from openrlhf_dual.artifacts import iter_jsonl, read_jsonl, write_json, write_jsonl, write_npy
from openrlhf_dual.pairs import pair_row, pairs_from_samples
from openrlhf_dual.ppo_reward import write_reward_file

SHARD = "shard-{:05d}"
ALGOS = ("mocan", "pecan")
SCORE_INPUTS = ("reward", "safety", "algo", "pairs_dataset", "pairs_keys")  # --dual.rescore may change these
# Below this many effective samples (1 / sum_k w_k^2 at lambda*) on any prompt, lambda* and the
# primal step lean on a handful of samples: prepare warns (toy world, seed 1 at b = 1.0: 3.4 of
# K = 128 gave lambda 5% high and KL(trained || optimum) 0.058 of KL(ref || optimum); K = 256: 11.7, 0.012).
MIN_EFFECTIVE_SAMPLES = 10.0
SCORED = ("pair_scores.npy", "dual.json", "frontier.json", "frontier.png", "pairs.jsonl")  # derived from scores


class PrepError(RuntimeError):
    """Bad input or an inconsistent prep directory; nothing already written is lost."""


@dataclass(frozen=True)
class PrepConfig:
    prep_dir: str
    ref_model: str
    prompt_dataset: str
    reward: str  # source spec, see openrlhf_dual.scoring.parse_source (PeCAN: policy:PATH of pi_r)
    safety: tuple[str, ...]
    thresholds: tuple[float, ...]  # MoCAN: E[g_j] >= b_j; PeCAN: margin E[g_j] - E_ref[g_j] >= b_j, g = beta log-ratio
    beta: float = 0.1
    algo: str = "mocan"
    prompt_split: str = "train"
    input_key: str = "input"
    input_template: str | None = None
    apply_chat_template: bool = False
    max_samples: int = 1000  # N prompts
    n_samples: int = 16  # K responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 42
    backend: str = "hf"
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    shard_size: int = 64
    bootstrap: int = 0
    pairs_dataset: str | None = None  # training pairs from this dataset's responses, not from the samples
    pairs_keys: tuple[str, str] = ("response_0", "response_1")
    vllm: dict = field(default_factory=dict)
    rescore: bool = False  # score the kept samples again (sources changed), see open_manifest

    def fingerprint(self) -> dict:
        """The inputs that determine samples and scores (a rerun must match them)."""
        keep = {"thresholds", "beta", "bootstrap", "prep_dir", "num_actors", "num_gpus_per_actor", "vllm", "rescore"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in keep}


def _versions() -> dict:
    import openrlhf_dual

    out = {"python": platform.python_version(), "openrlhf_dual": openrlhf_dual.__version__}
    for name in ("openrlhf", "torch", "transformers", "ray", "vllm"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def _identity(cfg: PrepConfig) -> dict:
    """What the reference model and each source point at (openrlhf_dual.scoring.identity)."""
    from openrlhf_dual.scoring.identity import IdentityError, setup_identity

    try:
        return setup_identity(cfg.ref_model, cfg.reward, cfg.safety)
    except (IdentityError, OSError) as err:
        raise PrepError(f"cannot tell what a source points at: {err}") from err


def _stale_scores(cfg: PrepConfig, fp: dict, manifest: dict, identity: dict) -> list[str]:
    """Why the scores in a prep directory are not those its sources give now ([] if they are);
    raises when the samples themselves are not those the inputs would draw."""
    from openrlhf_dual.scoring.identity import changes

    diff = sorted(k for k in set(fp) | set(manifest["inputs"]) if fp.get(k) != manifest["inputs"].get(k))
    if any(k not in SCORE_INPUTS for k in diff):
        raise PrepError(
            f"{cfg.prep_dir} was prepared from other inputs ({', '.join(diff)} differ); "
            "use a new --dual.prep_dir rather than mixing samples or scores of two setups"
        )
    stale = [f"--dual.{k} differs" for k in diff]
    old = manifest.get("identity")
    if old is None:  # written before sources were identified: nothing to compare with
        print(f"prepare: {cfg.prep_dir} records no source identities (an older version wrote it); "
              "recording them now", file=sys.stderr)  # fmt: skip
        return stale
    ref = changes(old["ref_model"], identity["ref_model"])
    if ref:
        raise PrepError(
            f"the reference model {cfg.ref_model} changed since it drew the samples in {cfg.prep_dir} "
            f"({'; '.join(ref)}); use a new --dual.prep_dir"
        )
    for before, now in zip(old["sources"], identity["sources"]):
        what = changes(before["identity"], now["identity"]) if before["spec"] == now["spec"] else []
        if what:
            stale.append(f"source {now['spec']} changed since it scored ({'; '.join(what)})")
    return stale


def open_manifest(cfg: PrepConfig) -> dict:
    """Create the manifest, or check that an existing prep directory was made from the same inputs
    and scored by the same sources (what they point at, not only their specs). Changed sources or
    score inputs are refused unless cfg.rescore, which drops every score and what was derived from
    them and keeps the samples."""
    path = Path(cfg.prep_dir) / "manifest.json"
    identity = _identity(cfg)
    for source in identity["sources"]:
        if source["identity"].get("stated") == "nothing":
            print(f"prepare: {source['spec']} states no identity: a model swapped behind it cannot be detected",
                  file=sys.stderr)  # fmt: skip
    fp = json.loads(json.dumps(cfg.fingerprint()))  # tuples -> lists, as stored
    if not path.exists():
        manifest = {"inputs": fp, "identity": identity, "versions": _versions(), "records": {}, "stages": {}}
        write_json(path, manifest)
        return manifest
    manifest = json.loads(path.read_text())
    stale = _stale_scores(cfg, fp, manifest, identity)
    if stale and not cfg.rescore:
        raise PrepError(
            f"{cfg.prep_dir} holds scores of other sources: {'; '.join(stale)}. Rerun with --dual.rescore to "
            "score its samples again with the sources as they are now, or restore the sources"
        )
    if cfg.rescore:  # scores first, then the manifest: an interruption between leaves no mixed scores
        for f in [*(Path(cfg.prep_dir) / "scores").glob("*.npy"), *(Path(cfg.prep_dir) / n for n in SCORED)]:
            f.unlink(missing_ok=True)
    manifest.update(inputs=fp, identity=identity)
    write_json(path, manifest)
    return manifest


def load_prompts(cfg: PrepConfig, dataset: str, limit: int, extra_keys: tuple[str, ...] = ()) -> list[dict]:
    """Prompt rows by OpenRLHF's prompt-dataset conventions (path or name, split, input key,
    chat template or input template, max samples): {"id", "raw", "prompt"} plus `extra_keys`."""
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from openrlhf.datasets.utils import blending_datasets
    from transformers import AutoTokenizer

    # blending_datasets only logs through its strategy and asks it about rank 0 / ModelScope
    strategy = SimpleNamespace(print=lambda *a: None, is_rank_0=lambda: True, args=SimpleNamespace(use_ms=False))
    data = blending_datasets(dataset, None, strategy, cfg.seed, max_count=limit, dataset_split=cfg.prompt_split)
    missing = [k for k in (cfg.input_key, *extra_keys) if k not in data.column_names]
    if missing:
        raise PrepError(f"{dataset} has no column {missing[0]!r} (columns: {data.column_names}); check the --data/--dual keys")
    data = data.select(range(min(limit, len(data))))
    template = None
    if cfg.apply_chat_template:
        template = AutoTokenizer.from_pretrained(cfg.ref_model, trust_remote_code=False).apply_chat_template
    rows = []
    for i, row in enumerate(data):
        prompt, _ = preprocess_data(row, cfg.input_template, cfg.input_key, None, template)
        raw = row[cfg.input_key]
        raw = raw if isinstance(raw, str) else raw[-1]["content"]
        rows.append({"id": i, "raw": raw, "prompt": prompt, **{k: row[k] for k in extra_keys}})
    if not rows:
        raise PrepError(f"no prompts in {dataset} (split {cfg.prompt_split})")
    return rows


def _scorer(cfg: PrepConfig):
    from openrlhf_dual.score_actors import SampleScorer

    return SampleScorer(cfg.reward, cfg.safety, ref_model=cfg.ref_model, num_actors=cfg.num_actors,
                        num_gpus_per_actor=cfg.num_gpus_per_actor)  # fmt: skip


def _score(scorer, rows: list[dict], samples: list[list[dict]]) -> np.ndarray:
    from openrlhf_dual.score_actors import ScoringError

    try:
        return scorer(rows, samples)
    except ScoringError as err:
        raise PrepError(str(err)) from err


def _sample_and_score(cfg: PrepConfig, prompts: list[dict], todo: list[int], out: Path) -> dict:
    """Sample every unfinished shard, release the sampler's GPUs, then score; returns seconds spent
    {"sample", "score"}. The stages run one after the other, so each alone must fit the Ray cluster:
    if one cannot be placed, a PrepError says what each asks for (openrlhf_dual.sampling.placement)."""
    import ray

    from openrlhf_dual.sampling import PlacementError, ReferenceSampler, SamplingConfig, SamplingError, sampler_stage
    from openrlhf_dual.sampling.placement import await_gpus, check_stages
    from openrlhf_dual.score_actors import scorer_stage

    spent = {"sample": 0.0, "score": 0.0}
    sampling = SamplingConfig(
        n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed
    )
    shard_rows = lambda s: prompts[s * cfg.shard_size : (s + 1) * cfg.shard_size]  # noqa: E731
    sample_path = lambda s: out / "samples" / f"{SHARD.format(s)}.jsonl"  # noqa: E731
    owns_ray = not ray.is_initialized()  # else: the caller's cluster (e.g. `ray job submit`)
    if owns_ray:
        ray.init()
    try:
        stages = [sampler_stage(cfg.backend, cfg.num_actors, cfg.num_gpus_per_actor, cfg.vllm),
                  scorer_stage(cfg.reward, cfg.safety, cfg.num_actors, cfg.num_gpus_per_actor)]  # fmt: skip
        check_stages(stages)
        unsampled = [s for s in todo if not sample_path(s).exists()]
        if unsampled:
            with ReferenceSampler(cfg.backend, cfg.ref_model, cfg.num_actors, sampling,
                                  num_gpus_per_actor=cfg.num_gpus_per_actor, stages=stages, **cfg.vllm) as sampler:  # fmt: skip
                for s in tqdm(unsampled, desc="prepare: sample shards"):
                    rows = shard_rows(s)
                    t = time.perf_counter()
                    got = sampler.sample([r["prompt"] for r in rows], indices=[r["id"] for r in rows])
                    spent["sample"] += time.perf_counter() - t
                    samples = [[dataclasses.asdict(x) for x in per_prompt] for per_prompt in got]
                    write_jsonl(sample_path(s), [{"id": r["id"], "responses": x} for r, x in zip(rows, samples)])
        await_gpus(stages[1], stages)
        scorer = _scorer(cfg)
        try:
            for s in tqdm(todo, desc="prepare: score shards"):
                samples = [r["responses"] for r in read_jsonl(sample_path(s))]
                t = time.perf_counter()
                scores = _score(scorer, shard_rows(s), samples)
                spent["score"] += time.perf_counter() - t
                write_npy(out / "scores" / f"{SHARD.format(s)}.npy", scores)
        finally:
            scorer.close()
    except (PlacementError, SamplingError) as err:
        raise PrepError(str(err)) from err
    finally:
        if owns_ray:
            ray.shutdown()
    return spent


def _dataset_pairs(cfg: PrepConfig, out: Path, lam: np.ndarray) -> list[dict]:
    """Pairs from a preference dataset's own two responses per prompt (PKU-SafeRLHF's
    response_0/response_1), scored by the same sources; scores kept in pair_scores.npy [n, 2, 1 + m]."""
    keys = tuple(cfg.pairs_keys)
    rows = load_prompts(cfg, cfg.pairs_dataset, 10**9, keys)
    path = out / "pair_scores.npy"
    if not path.exists():
        scorer = _scorer(cfg)
        samples = [[{"text": r[k]} for k in keys] for r in rows]
        scores = np.concatenate(
            [_score(scorer, rows[i : i + cfg.shard_size], samples[i : i + cfg.shard_size])
             for i in tqdm(range(0, len(rows), cfg.shard_size), desc="prepare: score dataset pairs")]
        )  # fmt: skip
        write_npy(path, scores)
        scorer.close()
    scores = np.load(path)
    if scores.shape[0] != len(rows):
        raise PrepError(f"{path} holds {scores.shape[0]} scored pairs but {cfg.pairs_dataset} has {len(rows)}")
    return [pair_row(r["prompt"], r["id"], (r[keys[0]], r[keys[1]]), s, lam) for r, s in zip(rows, scores)]


def load_scores(prep_dir: Path) -> np.ndarray:
    """Every shard's scores of a prep directory in one float64 [N, K, 1 + m] array (N: the rows of
    prompts.jsonl; shards of the manifest's shard_size), filled a shard at a time. A missing shard,
    or one of another shape (another K or m, a torn prep directory), is refused."""
    prep_dir = Path(prep_dir)
    try:
        n = sum(1 for _ in iter_jsonl(prep_dir / "prompts.jsonl"))
        shard_size = json.loads((prep_dir / "manifest.json").read_text())["inputs"]["shard_size"]
    except (FileNotFoundError, KeyError) as err:
        raise PrepError(f"{prep_dir} is not a prep directory ({err}): run prepare first") from err
    scores = None
    for s in range(math.ceil(n / shard_size)):
        path = prep_dir / "scores" / f"{SHARD.format(s)}.npy"
        if not path.exists():
            raise PrepError(f"{path} not found: prepare has not finished, rerun it to resume")
        part = np.load(path)
        scores = np.empty((n, *part.shape[1:])) if scores is None else scores
        rows = scores[s * shard_size : (s + 1) * shard_size]
        if part.shape != rows.shape:
            raise PrepError(f"{path} holds scores of shape {part.shape}, expected {rows.shape}")
        rows[:] = part
    if scores is None:
        raise PrepError(f"{prep_dir}/prompts.jsonl holds no prompts")
    return scores


def _read_samples(cfg: PrepConfig, out: Path, prompts: list[dict], scores: np.ndarray, lam: np.ndarray | None) -> dict:
    """One streaming pass over the sample shards, a prompt's line at a time (each checked against
    its prompt and scores): the records, and with lam the pairs written to pairs.jsonl as they come
    (openrlhf_dual.pairs). Returns {"empty_responses", "unfinished_responses",
    "identical_pairs_dropped", "pairs"}."""
    counts = dict.fromkeys(("empty_responses", "unfinished_responses", "identical_pairs_dropped", "pairs"), 0)
    scale = cfg.beta if cfg.algo == "pecan" else 1.0  # PeCAN pairs carry beta * log-ratios: reward units

    def pairs():
        i = 0
        for s in range(math.ceil(len(prompts) / cfg.shard_size)):
            path = out / "samples" / f"{SHARD.format(s)}.jsonl"
            for row in iter_jsonl(path):
                if i >= len(prompts) or row["id"] != prompts[i]["id"] or len(row["responses"]) != scores.shape[1]:
                    raise PrepError(f"{path} does not match prompts.jsonl and the scores at prompt {i}: a torn prep directory?")
                texts = [x["text"] for x in row["responses"]]
                counts["empty_responses"] += texts.count("")
                counts["unfinished_responses"] += sum(not x["finished"] for x in row["responses"])
                if lam is not None:
                    rows, dropped = pairs_from_samples([prompts[i]], [texts], scale * scores[i : i + 1], lam)
                    counts["identical_pairs_dropped"] += dropped
                    counts["pairs"] += len(rows)
                    yield from rows
                i += 1
        if i != len(prompts):
            raise PrepError(f"the sample shards hold {i} prompts, prompts.jsonl {len(prompts)}")

    if lam is None:
        for _ in pairs():
            pass
    else:
        write_jsonl(out / "pairs.jsonl", pairs())
    return counts


def run_prepare(cfg: PrepConfig) -> dict:
    """Run every unfinished stage; returns the dual solution as written to dual.json.
    Raises PrepError for an infeasible threshold after writing the scores and dual.json."""
    from openrlhf_dual.dual import frontier, plot_frontier, solve_dual

    from openrlhf_dual.scoring import parse_source
    from openrlhf_dual.scoring.registry import KINDS

    if len(cfg.thresholds) != len(cfg.safety):
        raise PrepError(f"{len(cfg.safety)} safety sources but {len(cfg.thresholds)} thresholds")
    try:  # bad specs fail here, before Ray starts
        specs = [parse_source(cfg.reward, "reward"), *(parse_source(spec, "safety") for spec in cfg.safety)]
    except ValueError as err:
        raise PrepError(str(err)) from err
    want = "policy" if cfg.algo == "pecan" else None
    if cfg.algo not in ALGOS or any((s.kind == "policy") != (want == "policy") for s in specs):
        raise PrepError(
            "--dual.algo pecan scores with the pre-aligned policies' implicit rewards: give every source as "
            f"policy:PATH; --dual.algo mocan takes text scorers ({', '.join(k for k in KINDS if k != 'policy')})"
        )
    if cfg.algo == "pecan" and cfg.pairs_dataset:
        raise PrepError("--dual.pairs_dataset is for MoCAN; PeCAN trains on pi_ref's own samples (their exact token ids)")
    out = Path(cfg.prep_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = open_manifest(cfg)
    # how prepare placed its actors (not part of the fingerprint): evaluate's defaults
    manifest["placement"] = {"num_actors": cfg.num_actors, "num_gpus_per_actor": cfg.num_gpus_per_actor, "vllm": cfg.vllm}
    t0 = time.perf_counter()
    prompts_path = out / "prompts.jsonl"
    prompts = read_jsonl(prompts_path) if prompts_path.exists() else load_prompts(cfg, cfg.prompt_dataset, cfg.max_samples)
    write_jsonl(prompts_path, prompts)
    n_shards = math.ceil(len(prompts) / cfg.shard_size)
    todo = [s for s in range(n_shards) if not (out / "scores" / f"{SHARD.format(s)}.npy").exists()]
    spent = _sample_and_score(cfg, prompts, todo, out) if todo else {"sample": 0.0, "score": 0.0}

    scores = load_scores(out)  # the one thing held whole
    form = "margin" if cfg.algo == "pecan" else "model"
    sol = solve_dual(scores[..., 0], scores[..., 1:], np.asarray(cfg.thresholds), cfg.beta, bootstrap=cfg.bootstrap, form=form)
    solution = sol.to_dict()
    write_json(out / "dual.json", solution)
    if sol.feasible and sol.min_effective_samples < MIN_EFFECTIVE_SAMPLES:
        print(f"prepare: WARNING: few samples carry lambda*: at lambda* the weights of one prompt rest on "
              f"{sol.min_effective_samples:.1f} effective samples of K = {scores.shape[1]} (below "
              f"{MIN_EFFECTIVE_SAMPLES:.0f}); lambda* and the primal step are sample-limited: raise "
              f"--rollout.n_samples_per_prompt (a stringent threshold needs more samples)", file=sys.stderr)  # fmt: skip
    if scores.shape[-1] == 2:
        curve = frontier(scores[..., 0], scores[..., 1], cfg.beta, form=form)
        write_json(out / "frontier.json", curve.to_dict())
        plot_frontier(curve, out / "frontier.png", threshold=cfg.thresholds[0])
    # one pass over the samples, a prompt at a time: records, and the pairs when they come from them
    records = _read_samples(cfg, out, prompts, scores, sol.lam if sol.feasible and not cfg.pairs_dataset else None)
    n_pairs = records.pop("pairs")
    manifest["records"].update(records)
    if not sol.feasible:
        write_json(out / "manifest.json", manifest)
        raise PrepError(
            f"threshold(s) {list(cfg.thresholds)} cannot be reached by reweighting pi_ref's samples "
            f"(reachable maximum per constraint: {np.asarray(sol.reachable).tolist()}); scores are kept in "
            f"{out}: rerun with a lower --dual.threshold (only the dual is re-solved)"
        )
    if cfg.pairs_dataset:
        rows = _dataset_pairs(cfg, out, sol.lam)
        write_jsonl(out / "pairs.jsonl", rows)
        n_pairs = len(rows)
    if form == "model":  # r + lambda*.g for PPO needs text scorers
        write_reward_file(out)
    manifest["stages"] = {
        "shards": n_shards,
        "shards_this_run": len(todo),
        "sample_seconds": spent["sample"],
        "score_seconds": spent["score"],
        "total_seconds": time.perf_counter() - t0,
        "pairs": n_pairs,
        "thresholds": list(cfg.thresholds),
        "beta": cfg.beta,
    }
    write_json(out / "manifest.json", manifest)
    return solution
