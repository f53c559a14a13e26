"""Adapters that turn score sources into float64 arrays; one module per source kind."""

from openrlhf_dual.scoring.base import ScoreBatch, Scorer, SourceSpec, build_scorer, parse_source

__all__ = ["ScoreBatch", "Scorer", "SourceSpec", "build_scorer", "parse_source"]
