"""Score sources by name: what a spec string means, which module scores each kind, and the checks
every source's scores go through."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch, Scorer
from openrlhf_dual.scoring.classifier import ClassifierScorer
from openrlhf_dual.scoring.hub import Checkpoint, resolve_checkpoint
from openrlhf_dual.scoring.judge import JudgeScorer
from openrlhf_dual.scoring.openrlhf_rm import OpenRLHFRewardScorer
from openrlhf_dual.scoring.remote import RemoteScorer
from openrlhf_dual.scoring.reward_file import RewardFileScorer
from openrlhf_dual.scoring.safe_rlhf import SafeRLHFScorer

_MODEL = {"batch_size", "max_len", "dtype", "revision", "trust_remote_code"}
# the options each kind takes besides `sign`
KIND_OPTIONS = {
    "rm": _MODEL | {"normalize", "value_head_prefix"},
    "safe_rlhf": _MODEL | {"normalize"},
    "classifier": _MODEL | {"label", "output", "text"},
    "judge": _MODEL | {"safe", "unsafe"},
    "remote": {"batch_size", "timeout"},
    "file": {"batch_size"},
    "policy": set(),
}
REQUIRED = {"classifier": ("label",)}
KINDS = tuple(KIND_OPTIONS)
MODEL_KINDS = tuple(k for k, options in KIND_OPTIONS.items() if "revision" in options)


@dataclass(frozen=True)
class SourceSpec:
    """`KIND:LOCATION[,key=value...]`, e.g. `safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1`.
    LOCATION of a model kind is a local directory or a hub name (`revision=` picks a branch, tag or
    commit; see openrlhf_dual.scoring.hub). KIND `policy` is a DPO-aligned
    policy whose implicit reward log pi/pi_ref is the score (PeCAN)."""

    kind: str
    location: str
    sign: float = 1.0
    options: dict = field(default_factory=dict)
    text: str = ""

    def option(self, key: str, default):
        value = self.options.get(key)
        if value is None:
            return default
        if isinstance(default, bool):
            return self.flag(key, default)
        return type(default)(value) if default is not None else value

    def flag(self, key: str, default: bool | None) -> bool | None:
        value = self.options.get(key)
        if value is None:
            return default
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"score source {self.text!r}: {key}={value}: expected true or false")
        return value.lower() in ("1", "true", "yes")


def parse_source(text: str, role: str = "reward") -> SourceSpec:
    """Parse a source spec. A safety source must declare its sign: +1 (higher is safer) or -1 (a
    cost, turned into safety g = -cost); a reward source defaults to +1."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"score source {text!r}: expected KIND:LOCATION with KIND one of {', '.join(KINDS)}")
    location, *opts = rest.split(",")
    options = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in KIND_OPTIONS[kind] | {"sign"}:
            known = ", ".join(sorted(KIND_OPTIONS[kind] | {"sign"}))
            raise ValueError(f"score source {text!r}: unknown option {opt!r} for {kind} (known: {known})")
        options[key] = value
    missing = [key for key in REQUIRED.get(kind, ()) if key not in options]
    if missing:
        raise ValueError(f"score source {text!r}: {kind} needs {', '.join(k + '=...' for k in missing)}")
    if "sign" not in options and role == "safety":
        raise ValueError(
            f"safety source {text!r}: declare sign=+1 (higher is safer) or sign=-1 (a cost: safety g = -cost)"
        )
    sign = float(options.pop("sign", 1))
    if sign not in (1.0, -1.0):
        raise ValueError(f"score source {text!r}: sign must be +1 or -1, got {sign}")
    if not location:
        raise ValueError(f"score source {text!r}: empty location")
    return SourceSpec(kind, location, sign, options, text)


def checkpoint_of(spec: SourceSpec) -> Checkpoint | None:
    """The local checkpoint a model source reads (a hub name resolved, downloaded unless offline)
    and the hub revision it resolved to; None for kinds without a checkpoint."""
    if spec.kind not in MODEL_KINDS:
        return None
    return resolve_checkpoint(spec.location, spec.options.get("revision"))


class _Checked:
    """Applies the declared sign and refuses wrong-length or non-finite scores, naming the source.
    `checkpoint`: where a model source was loaded from (path, resolved hub revision)."""

    def __init__(self, inner: Scorer, spec: SourceSpec, checkpoint: Checkpoint | None = None):
        self.inner, self.spec, self.checkpoint = inner, spec, checkpoint

    def score(self, batch: ScoreBatch) -> np.ndarray:
        out = np.asarray(self.inner.score(batch), dtype=np.float64).reshape(-1)
        if out.shape[0] != len(batch):
            raise ValueError(f"source {self.spec.text}: {out.shape[0]} scores for {len(batch)} responses")
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise ValueError(f"source {self.spec.text}: {bad.size} non-finite scores (first at {bad[:5].tolist()})")
        return self.spec.sign * out


def build_scorer(spec: SourceSpec, device: str = "cpu") -> Scorer:
    """The scorer for a spec, with its sign applied and its output checked."""
    if spec.kind == "policy":
        raise ValueError(
            f"{spec.text}: a policy's implicit reward is scored from token ids by log-probs "
            "(openrlhf_dual.score_actors, prepare --dual.algo pecan), not from text"
        )
    if spec.kind == "file":
        return _Checked(RewardFileScorer(spec.location, batch_size=spec.option("batch_size", 64)), spec)
    if spec.kind == "remote":
        return _Checked(
            RemoteScorer(spec.location, batch_size=spec.option("batch_size", 64), timeout=spec.option("timeout", 60.0)), spec
        )
    checkpoint = checkpoint_of(spec)
    common = dict(
        device=device, batch_size=spec.option("batch_size", 16), dtype=spec.option("dtype", "auto"),
        trust_remote_code=spec.option("trust_remote_code", False),
    )  # fmt: skip
    path = str(checkpoint.path)
    if spec.kind == "rm":
        inner = OpenRLHFRewardScorer(
            path, max_len=spec.option("max_len", 2048), normalize=spec.option("normalize", True),
            value_head_prefix=spec.option("value_head_prefix", None), **common,
        )  # fmt: skip
    elif spec.kind == "safe_rlhf":
        inner = SafeRLHFScorer(path, max_len=spec.option("max_len", 512), normalize=spec.flag("normalize", None), **common)
    elif spec.kind == "classifier":
        inner = ClassifierScorer(
            path, label=spec.options["label"], output=spec.option("output", "logodds"),
            text=spec.option("text", "response"), max_len=spec.option("max_len", 0) or None, **common,
        )  # fmt: skip
    else:
        inner = JudgeScorer(
            path, safe=spec.option("safe", "safe"), unsafe=spec.option("unsafe", "unsafe"),
            max_len=spec.option("max_len", 0) or None, **common,
        )  # fmt: skip
    return _Checked(inner, spec, checkpoint)
