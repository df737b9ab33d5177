"""The compile cache directory (the user's ``TORCHINDUCTOR_CACHE_DIR`` if set, else a persistent mstudio default)
and the inductor options a compiled step passes on."""

import os
import threading

import pytest

import losses
import mstudio
from mstudio.compile import (CACHE_ENV, check_compile_options, compile_cache_dir, compiled_call,
                             configure_compile_cache, inductor_options, probe_cpu_compiler_in_background)
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy


def test_the_users_directory_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert configure_compile_cache() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir() and os.environ[CACHE_ENV] == str(tmp_path / "mine")


def test_the_default_is_under_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "mstudio" / "inductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / ".cache" / "mstudio" / "inductor"
    assert configure_compile_cache() == tmp_path / "home" / ".cache" / "mstudio" / "inductor"
    assert os.environ[CACHE_ENV] == str(tmp_path / "home" / ".cache" / "mstudio" / "inductor")


def test_an_unusable_directory_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError, match="cannot create the compile cache directory .*file/cache"):
        configure_compile_cache()


def test_torchs_own_default_in_the_variable_is_not_taken_for_a_choice(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its /tmp default into the variable on its first compile or torch._dynamo.reset()
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert configure_compile_cache() == tmp_path / "mstudio" / "inductor"


def test_compile_options_are_checked_and_copied():
    options = {"cpp_wrapper": True}
    assert check_compile_options(None) == {}
    assert check_compile_options(options) == options and check_compile_options(options) is not options
    with pytest.raises(ValueError, match=r"unknown inductor option\(s\) \['cpp_wraper'\]"):
        check_compile_options({"cpp_wraper": True})
    with pytest.raises(TypeError, match="mapping of inductor option names"):
        check_compile_options(["cpp_wrapper"])


def test_cuda_graphs_join_the_callers_options_which_win():
    assert inductor_options({"cpp_wrapper": True}, cuda_graphs=False) == {"cpp_wrapper": True}
    assert inductor_options({}, cuda_graphs=True) == {"triton.cudagraphs": True}
    assert inductor_options({"triton.cudagraphs": False, "max_autotune": True}, cuda_graphs=True) == {
        "triton.cudagraphs": False, "max_autotune": True}


def test_make_train_step_rejects_unknown_options_before_any_call():
    policy = TinyPolicy(hidsize=16, image_size=16)
    with pytest.raises(ValueError, match="nope"):
        mstudio.make_train_step(policy, losses.weighted(losses.behavior_clone, 0.01), mstudio.optim.adamw(1e-3),
                                compile_options={"nope": 1})


def test_the_compiled_step_hands_its_options_to_torch_compile(monkeypatch):
    import mstudio.train.step as step_module

    seen = []

    def spy_compile(fn, **kwargs):  # records the arguments, runs the step uncompiled
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(step_module.torch, "compile", spy_compile)
    probes = []
    monkeypatch.setattr(step_module, "probe_cpu_compiler_in_background", lambda: probes.append(1))
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.weighted(losses.behavior_clone, 0.01), optimizer,
                                   compile_options={"cpp_wrapper": True})
    state = mstudio.init_state(policy, optimizer, 2)
    step(state, random_batch(2, 4, 16, seed=0))
    assert seen == [{"fullgraph": True, "options": {"cpp_wrapper": True}}]
    assert probes == [1]  # on CPU the compiler probe starts before the compile


def test_the_compiler_probe_runs_in_a_daemon_thread_and_its_failure_is_ignored(monkeypatch):
    import threading

    from torch._inductor import cpu_vec_isa

    calls = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: calls.append(threading.current_thread().name))
    thread = probe_cpu_compiler_in_background()
    thread.join(timeout=10)
    assert thread.daemon and not thread.is_alive() and calls == ["mstudio-cpu-compiler-probe"]

    def broken():
        raise RuntimeError("no compiler")

    hooked = []
    monkeypatch.setattr(threading, "excepthook", hooked.append)  # an escaping exception would land here
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", broken)
    thread = probe_cpu_compiler_in_background()
    thread.join(timeout=10)
    assert not thread.is_alive() and hooked == []


def test_the_compiler_probe_thread_imports_nothing(tmp_path):
    # Its imports happen in the caller (the main thread, before tracing): imports racing the tracer's, setuptools'
    # edits of sys.meta_path among them, can make a module that exists fail to import. A fresh process, so
    # nothing is imported already.
    import subprocess
    import sys

    script = (
        "import sys, mstudio\n"
        "from mstudio.compile import probe_cpu_compiler_in_background\n"
        "thread = probe_cpu_compiler_in_background()\n"
        "started = set(sys.modules)\n"
        "thread.join()\n"
        "print(sorted(set(sys.modules) - started))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, CACHE_ENV: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_compiled_call_opens_the_autograd_cache_to_functions_for_the_call_only():
    import torch._functorch.config as functorch_config

    from mstudio import kernel_builds

    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    from mstudio.fusion_choices import output_fusion_choices

    seen = []

    def step(x):
        seen.append((functorch_config.autograd_cache_allow_custom_autograd_functions, kernel_builds._depth,
                     V.choices is output_fusion_choices(), inductor_config.inductor_choices_class))
        if x is None:
            raise ValueError("bad input")
        return x

    def in_a_new_thread():  # where inductor has not chosen its choices yet (they are per thread)
        call = compiled_call(step)
        results.append(call(3))
        try:
            call(None)
        except ValueError as error:
            results.append(str(error))
        results.append(type(V.choices))

    results = []
    thread = threading.Thread(target=in_a_new_thread)
    thread.start()
    thread.join()
    # inside batched kernel builds too, and with the widened fusion rule, which inductor's caches key on
    assert seen == [(True, 1, True, output_fusion_choices)] * 2
    assert results == [3, "bad input", InductorChoices]  # inductor's own choices again after the calls
    assert functorch_config.autograd_cache_allow_custom_autograd_functions is False and kernel_builds._depth == 0
    assert inductor_config.inductor_choices_class is None
    assert output_fusion_choices().uuid() == "mstudio.fusion_choices.output_fusion/1"
