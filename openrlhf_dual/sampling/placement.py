"""GPU placement on Ray, stage by stage, with a bounded wait.

prepare and evaluate run their stages one after the other (sample every shard, release the
engines' GPUs, then score), so each stage alone must fit the cluster. Every GPU request goes
through a placement group that must be ready within PLACEMENT_TIMEOUT_S; otherwise a
PlacementError says what each stage asks for and what the cluster has. Nothing waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENT_TIMEOUT_S = 30.0


class PlacementError(RuntimeError):
    """The GPUs a stage asks for cannot be had on this Ray cluster."""


@dataclass(frozen=True)
class Stage:
    name: str  # e.g. "sample", "score"
    bundles: tuple[dict, ...]  # Ray resource bundles, e.g. {"GPU": 1, "CPU": 1} per vLLM GPU
    what: str  # who asks, e.g. "vLLM: 8 engines x tensor parallel 1"

    @property
    def gpus(self) -> float:
        return float(sum(b.get("GPU", 0) for b in self.bundles))


def cluster_gpus() -> tuple[float, float]:
    """(GPUs in the Ray cluster, GPUs free now), as Ray counts them."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)), float(ray.available_resources().get("GPU", 0.0))


def describe(stages: list[Stage]) -> str:
    """'sample asks for 8 GPUs (...); score asks for 2 GPUs (...); the cluster has 8 GPUs, 8 free now'."""
    total, free = cluster_gpus()
    asks = "; ".join(f"{s.name} asks for {s.gpus:g} GPU{'s' if s.gpus != 1 else ''} ({s.what})" for s in stages)
    return f"{asks}; the Ray cluster has {total:g} GPUs, {free:g} free now (stages run one after the other)"


def check_stages(stages: list[Stage]) -> None:
    """Each stage alone must fit in the cluster's GPUs; fail at once, before anything starts."""
    total, _ = cluster_gpus()
    too_big = [s.name for s in stages if s.gpus > total]
    if too_big:
        raise PlacementError(
            f"{' and '.join(too_big)} cannot be placed: {describe(stages)}. Ask for fewer GPUs (--vllm.num_engines, "
            "--vllm.tensor_parallel_size, --dual.num_actors, --dual.num_gpus_per_actor) or add GPUs to the cluster"
        )


def reserve(stage: Stage, stages: list[Stage], timeout: float = PLACEMENT_TIMEOUT_S):
    """A ready placement group holding `stage`'s bundles (packed), or PlacementError after `timeout`
    seconds with nothing held. The caller removes it (`release`)."""
    from ray.util.placement_group import placement_group

    check_stages(stages)
    pg = placement_group(list(stage.bundles), strategy="PACK")
    if not pg.wait(timeout_seconds=timeout):
        release(pg)
        raise PlacementError(
            f"{stage.name} could not get its GPUs within {timeout:g} s: {describe(stages)}. Other jobs hold the rest; "
            "free them or ask for fewer"
        )
    return pg


def await_gpus(stage: Stage, stages: list[Stage], timeout: float = PLACEMENT_TIMEOUT_S) -> None:
    """Return once `stage`'s bundles could be placed (a probe group, released again), else PlacementError.
    For actors that Ray places by themselves (scorers): they would otherwise wait forever."""
    if stage.gpus > 0:
        release(reserve(stage, stages, timeout))


def release(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)
