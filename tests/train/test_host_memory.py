"""mstudio.host_memory: a CPU step makes glibc's malloc keep the large blocks it frees, so the next allocation of
that size faults no fresh pages in; opting out and other allocators leave malloc alone."""

import json
import os
import platform
import subprocess
import sys

import pytest

import losses
import mstudio
from mstudio import host_memory
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

on_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                              reason="malloc is glibc's only on Linux with glibc")

# Allocates and fills a 64 MiB tensor round after round (the way a step allocates its activations), and prints the
# minor page faults of four rounds after twenty untimed ones, with the system's malloc and after
# reuse_freed_memory() (glibc's heap settles within the untimed rounds: measured, 8). A fresh process: the setting
# is process-wide and cannot be undone.
FAULTS = """
import json, resource, torch
from mstudio.host_memory import reuse_freed_memory

def faults_of_reallocations():
    for _ in range(20):
        torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(16 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

system = faults_of_reallocations()
applied = reuse_freed_memory()
print(json.dumps({"system": system, "applied": applied, "after": faults_of_reallocations()}))
"""
PAGES_PER_BLOCK = 64 * 2**20 // 4096


def run_faults(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@on_glibc
def test_freed_blocks_are_reused_without_page_faults():
    faults = run_faults(MSTUDIO_MALLOC="reuse")
    assert faults["system"] >= 4 * PAGES_PER_BLOCK // 2  # glibc maps and unmaps the 64 MiB block every time
    assert faults["applied"] is True
    assert faults["after"] < PAGES_PER_BLOCK // 4  # the kept block's pages are already there


@on_glibc
def test_system_leaves_malloc_as_it_is():
    faults = run_faults(MSTUDIO_MALLOC="system")
    assert faults["applied"] is False
    assert faults["after"] >= 4 * PAGES_PER_BLOCK // 2


def test_an_unknown_choice_is_named(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("MSTUDIO_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="MSTUDIO_MALLOC='jemalloc': expected one of reuse, system"):
        host_memory.reuse_freed_memory()


def test_work_on_another_device_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: pytest.fail("malloc touched for a meta device"))
    assert host_memory.reuse_freed_memory("meta") is False
    assert host_memory._applied is None  # a later CPU step still applies it


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")
    assert host_memory._glibc_mallopt() is None


def test_a_cpu_step_applies_it_once_built(monkeypatch):
    import mstudio.train.step as step_module

    calls = []
    monkeypatch.setattr(step_module, "reuse_freed_memory", calls.append)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.weighted(losses.behavior_clone, 0.01), optimizer, compile=False)
    assert calls == []  # building the step does not touch the process; its first call does
    state = mstudio.init_state(policy, optimizer, 2)
    state, _ = step(state, random_batch(2, 4, 16, seed=0))
    step(state, random_batch(2, 4, 16, seed=1))
    assert calls == [state.step.device]  # once, for the CPU
