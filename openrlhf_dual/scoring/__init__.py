"""Adapters that turn score sources into float64 arrays; one module per source kind.

batch.py: what a scorer takes and returns; registry.py: source specs and which module scores each
kind; hub.py: where a model source's checkpoint lives (`checkpoint_of(spec)` gives its local path
and the hub commit it resolved to, without loading it). The kind modules import batch.py and
checkpoint.py only, so nothing here imports in a circle."""

from openrlhf_dual.scoring.batch import ScoreBatch, Scorer
from openrlhf_dual.scoring.registry import SourceSpec, build_scorer, checkpoint_of, parse_source

__all__ = ["ScoreBatch", "Scorer", "SourceSpec", "build_scorer", "checkpoint_of", "parse_source"]
