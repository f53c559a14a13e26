"""Shared by the vLLM tier's tests (and reusable by any test that needs Ray GPUs): a private Ray
instance with 2 GPUs (logical ones without CUDA) for a test module, and the check that nothing
holds a GPU any more."""

from __future__ import annotations

import time

import pytest

from openrlhf_dual.launch import ray_cluster

NUM_GPUS = 2


@pytest.fixture(scope="module")
def cluster():
    """Ray with NUM_GPUS GPUs for the module; RAY_ADDRESS points subprocesses (CLIs) at it."""
    with ray_cluster(num_gpus=NUM_GPUS) as address:
        yield address


def gpus_free_again(wait: float = 20.0) -> bool:
    """Every GPU of the cluster free and no placement group left, within `wait` seconds."""
    import ray
    from ray.util import placement_group_table

    end = time.time() + wait
    while time.time() < end:
        live = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if ray.available_resources().get("GPU", 0.0) == NUM_GPUS and not live:
            return True
        time.sleep(0.5)
    return False
