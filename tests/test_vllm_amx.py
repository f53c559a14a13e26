"""vLLM's CPU build on an AMX CPU: every vLLM process holds Linux's AMX tile-data permission
(openrlhf_dual.amx, a vLLM general plugin), without which vLLM's AMX attention dies with SIGILL in
any worker where no other library asked first (vLLM tier: `make test-vllm`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm

# In a fresh interpreter (permission is dropped at exec): the tile-data bit before and after vLLM
# loads its general plugins as each of its processes does, and whether vLLM runs on a CPU with AMX.
PROBE = """
import ctypes
import torch
from vllm.platforms import current_platform
from vllm.plugins import load_general_plugins

libc = ctypes.CDLL(None, use_errno=True)

def tile_data_permitted():
    mask = ctypes.c_uint64()
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0  # arch_prctl(ARCH_GET_XCOMP_PERM)
    return bool(mask.value >> 18 & 1)  # XFEATURE_XTILEDATA

before = tile_data_permitted()
load_general_plugins()
print(before, tile_data_permitted(), current_platform.is_cpu() and torch.cpu._is_amx_tile_supported())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX and arch_prctl are x86-64 only")
def test_vllm_processes_ask_for_amx_tiles():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after, amx_cpu = proc.stdout.split()[-3:]
    assert before == "False"  # nothing asked yet: vLLM's AMX attention would die with SIGILL here
    assert after == amx_cpu  # "True" on vLLM's CPU build on an AMX CPU (this machine); a no-op elsewhere
