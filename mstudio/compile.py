"""How compiled steps are compiled: the inductor options a caller passes, and where they are cached (a persistent
directory for inductor's FX-graph and AOTAutograd caches).

Compiling the VPT step costs under a minute on a small CPU (``tiny``: 44 s on 2 cores, its C++ kernels built in
batches by :mod:`mstudio.kernel_builds`); with the caches a second process that builds the same step (a resumed
run, the next experiment with other hyper-parameters) loads the compiled graph and its C++ kernels from disk
instead. torch keeps both caches on by default
(``torch._inductor.config.fx_graph_cache``, ``torch._functorch.config.enable_autograd_cache``) but under
``/tmp/torchinductor_<user>``, which a reboot or a tmp cleaner empties. mstudio points them at
``~/.cache/mstudio/inductor`` (``$XDG_CACHE_HOME`` if set) unless ``TORCHINDUCTOR_CACHE_DIR`` is set to another
directory: then that one is used, as torch would.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mstudio.fusion_choices import output_fusion
from mstudio.kernel_builds import with_batched_kernel_builds

__all__ = ["CACHE_ENV", "check_compile_options", "compile_cache_dir", "compiled_call", "configure_compile_cache",
           "inductor_options", "probe_cpu_compiler_in_background"]

#: The environment variable torch's inductor reads its cache directory from.
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _torch_default() -> str:
    """The directory torch picks when ``TORCHINDUCTOR_CACHE_DIR`` is unset; torch then writes it into the variable
    itself (on its first compile, or ``torch._dynamo.reset()``), so that value does not mean the user chose it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def compile_cache_dir() -> Path:
    """The directory compiled steps are cached in: ``$TORCHINDUCTOR_CACHE_DIR`` if set (to anything but torch's
    own default, which torch writes there itself), else ``$XDG_CACHE_HOME/mstudio/inductor``
    (``~/.cache/mstudio/inductor`` without ``XDG_CACHE_HOME``)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen and os.path.abspath(chosen) != _torch_default():
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mstudio" / "inductor"


def configure_compile_cache() -> Path:
    """Set ``TORCHINDUCTOR_CACHE_DIR`` to :func:`compile_cache_dir` (unchanged when already set) and create it.

    Called by :func:`mstudio.make_train_step` before it compiles; it takes effect for the compiles that start
    after it (torch reads the variable whenever it opens its caches).

    Raises:
        OSError: the directory cannot be created (naming it); set ``TORCHINDUCTOR_CACHE_DIR`` to a writable one.
    """
    directory = compile_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the compile cache directory {directory} ({error}); set {CACHE_ENV} to a "
                      "writable directory") from error
    os.environ[CACHE_ENV] = str(directory)
    return directory


def compiled_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a ``torch.compile``-d step) called as mstudio compiles: the C++ kernels of its compiles built in
    batches (:mod:`mstudio.kernel_builds`), the optimizer's loops fused at any distance
    (:mod:`mstudio.fusion_choices`), and AOTAutograd's cache open to graphs with an ``autograd.Function``.

    torch's AOTAutograd cache turns away a graph that holds an ``autograd.Function`` unless
    ``torch._functorch.config.autograd_cache_allow_custom_autograd_functions`` is set, and VPT's max-pool is one
    (:mod:`mstudio.models.vpt.max_pool`): turned away, a warm start of VPT ``tiny``'s step took 13.6 s instead of
    7.9 s (AOTAutograd traced the graph again). Dynamo traces a Function's forward and backward into the graph,
    which is what the cache's key is made from.
    """
    import torch._functorch.config as functorch_config

    batched = with_batched_kernel_builds(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        # Set and restored by hand: functorch_config.patch costs ~20 us a call, this ~5.
        before = functorch_config.autograd_cache_allow_custom_autograd_functions
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
        try:
            with output_fusion():
                return batched(*args, **kwargs)
        finally:
            functorch_config.autograd_cache_allow_custom_autograd_functions = before

    return call


def check_compile_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` (inductor settings for ``torch.compile(options=...)``, e.g. ``{"cpp_wrapper": True}``) as a
    new dict, ``{}`` for ``None``.

    Raises:
        TypeError: ``options`` is not a mapping with string keys.
        ValueError: a key inductor does not know (``torch._inductor.list_options()``), naming it.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"compile_options must be a mapping of inductor option names to values, got {options!r}")
    from torch._inductor import list_options

    unknown = sorted(set(options) - set(list_options()))
    if unknown:
        raise ValueError(f"compile_options: unknown inductor option(s) {unknown}; torch._inductor.list_options() "
                         "lists the known ones (e.g. 'cpp_wrapper', 'max_autotune')")
    return dict(options)


def inductor_options(options: Mapping[str, Any], *, cuda_graphs: bool) -> dict[str, Any]:
    """What a compiled step passes as ``torch.compile(options=...)``: ``options`` plus, with ``cuda_graphs``,
    the settings of ``mode="reduce-overhead"`` (torch.compile takes a mode or options, not both; the caller's
    ``options`` win over the mode's)."""
    if not cuda_graphs:
        return dict(options)
    from torch._inductor import list_mode_options

    return {**list_mode_options("reduce-overhead"), **options}


def probe_cpu_compiler_in_background() -> threading.Thread | None:
    """Start inductor's probe of the C++ compiler's vector instruction sets in a daemon thread and return it.

    Before it generates its first CPU kernel, inductor compiles and loads a test program per instruction set,
    one after the other, while everything else waits: 6.5 s on 2 cores with an empty compile cache, 1.1 s with a
    warm one. Its result is cached for the process, so probing while dynamo traces the step (seconds of Python,
    during which the compiler runs on the other core) takes it off the first call's critical path. Call it after
    :func:`configure_compile_cache`, so the probe writes into the same cache. ``None`` when this torch has no
    such probe; a probe that fails is ignored (inductor probes again, and reports, when it needs the answer).
    """
    try:
        # Imported here, so the thread only runs the compiler: its lazy imports (inductor's code cache,
        # torch.utils.cpp_extension and with it setuptools, whose distutils shim edits sys.meta_path) would
        # otherwise run while this thread imports modules to trace the step. One cold compile failed so, with a
        # ModuleNotFoundError for a module that exists.
        for module in ("torch._inductor.codecache", "torch._inductor.cpp_builder", "torch.utils._filelock",
                       "torch.utils.cpp_extension"):
            importlib.import_module(module)
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:
        return None

    def probe() -> None:
        try:
            pick_vec_isa()
        except Exception:  # inductor repeats the probe on its own path and reports its error there
            pass

    thread = threading.Thread(target=probe, name="mstudio-cpu-compiler-probe", daemon=True)
    thread.start()
    return thread
