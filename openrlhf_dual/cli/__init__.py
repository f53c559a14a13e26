"""Command-line entry points: `python -m openrlhf_dual.cli.<verb>`."""
