"""Inductor's C++ kernels for the CPU built several per compiler run instead of one compiler run per kernel.

Inductor turns every fused CPU kernel of a graph into its own C++ file and runs g++ once per file. Each run
first loads the precompiled ``cpp_prefix.h`` (a 155 MB header image): on a 2-core Xeon that is 0.47 s of a
mid-size kernel's 0.66 s. VPT ``tiny``'s step has 78 kernels: 62 s of g++, 31 s of waiting on two workers,
most of it loading the same header. The same 78 kernels as two files, one per worker, build in 7.7 s.

While :func:`batched_kernel_builds` is entered (a compiled step enters it around every call, so the compile its
first call runs, a recompile, or a load from the compile cache all go through it), inductor's
``AsyncCompile.cpp_pybinding`` (called once per kernel as the compiled graph's module loads) only notes each
kernel. When the module first waits for one, the noted kernels are split into as many batches as inductor has
compile workers (balanced by source length), each batch becomes one C++ file (every kernel in a namespace of its
own, its entry point renamed, and one Python extension module exposing them all), and inductor's own
``CppPythonBindingsCodeCache`` builds and caches it: the same compiler, flags, precompiled header and on-disk
cache as for a single kernel (VPT's step trains to the same loss, bit for bit, at the same speed), and a second
process finds the batch on disk.

Kept per kernel, as inductor does it: a kernel whose source has preprocessor lines other than ``#include`` and
``#pragma`` (a macro would leak into the kernels after it), more than one ``kernel`` token, or an argument type
the bindings do not parse; a batch of one; and every kernel of a batch that fails to build (inductor then
builds each on its own and reports any real error there; the failure is logged). With one compile worker
(``TORCHINDUCTOR_COMPILE_THREADS=1``) inductor builds each kernel as it is defined, so nothing is batched. A
torch without these internals, or whose kernel bindings follow another protocol than the one the batch's
bindings copy, is left alone, as is anything compiled outside the context.
``MSTUDIO_KERNEL_BATCHING=0`` turns batching off.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["BATCHING_ENV", "batch_source", "batchable", "batched_kernel_builds", "batching_applies",
           "split_into_batches", "with_batched_kernel_builds"]

log = logging.getLogger(__name__)

#: Set to ``0`` to build every kernel on its own, as inductor does.
BATCHING_ENV = "MSTUDIO_KERNEL_BATCHING"

_ENTRY = re.compile(r"\bkernel\b")
_DIRECTIVE = re.compile(r"^\s*#\s*(\w+)", re.MULTILINE)
_INCLUDE = re.compile(r"^\s*#\s*include\b")
# The scalar argument types inductor's bindings parse (``parse_arg``), and the batch bindings' function reading
# each; every other argument is a pointer, a tensor's data.
_SCALARS = {"int64_t": "scalar_int64", "uintptr_t": "scalar_uintptr", "float": "scalar_float"}
_POINTER = re.compile(r"^[A-Za-z_][A-Za-z0-9_:]*\s*\*$")


def _parsed_type(argtype: str) -> str | None:
    """``argtype`` (as inductor lists it, e.g. ``"const float*"``) without ``const``; ``None`` if unsupported."""
    bare = argtype.replace("const ", "").strip()
    return bare if bare in _SCALARS or _POINTER.match(bare) else None


def batchable(argtypes: Sequence[str], source: str) -> bool:
    """Whether one kernel (inductor's ``argtypes`` and C++ ``source``) can share a file with others."""
    return (len(_ENTRY.findall(source)) == 1 and set(_DIRECTIVE.findall(source)) <= {"include", "pragma"}
            and all(_parsed_type(a) is not None for a in argtypes))


def split_into_batches(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices ``0..len(sizes)-1`` split into at most ``count`` non-empty batches of near-equal total size
    (largest first, each to the lightest batch), each batch in ascending index order. Deterministic, so the
    same kernels give the same batches, and the same cached files, in the next process with as many compile
    workers."""
    count = max(1, min(count, len(sizes)))
    batches: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(count), key=lambda b: (totals[b], b))
        batches[lightest].append(index)
        totals[lightest] += sizes[index]
    return [sorted(batch) for batch in batches if batch]


def _call_argument(parsed: str, position: int) -> str:
    """The C++ expression reading argument ``position`` of type ``parsed`` from the Python call's tuple."""
    if parsed in _SCALARS:
        return f"{_SCALARS[parsed]}(args, {position})"
    return f"static_cast<{parsed}>(tensor_data_ptr(PyTuple_GET_ITEM(args, {position})))"


def batch_source(kernels: Sequence[tuple[Sequence[str], str]]) -> str:
    """One C++ file for ``kernels`` (``(argtypes, source)`` pairs, each :func:`batchable`): their ``#include``
    lines first, then kernel ``i`` in ``namespace mstudio_batch_i`` with its entry point named ``kernel_i``,
    then a Python extension module ``kernel`` (what inductor's loader imports) whose method ``kernel_i`` calls
    it with the arguments inductor's generated code passes (tensors, then ints and floats)."""
    includes: list[str] = []
    bodies: list[str] = []
    for index, (_, source) in enumerate(kernels):
        body = []
        for line in source.splitlines():
            if _INCLUDE.match(line):
                if line.strip() not in includes:
                    includes.append(line.strip())
            else:
                body.append(line)
        renamed = _ENTRY.sub(f"kernel_{index}", "\n".join(body))
        bodies.append(f"namespace mstudio_batch_{index} {{\n{renamed}\n}}  // namespace mstudio_batch_{index}\n")
    methods, table = [], []
    for index, (argtypes, _) in enumerate(kernels):
        arguments = ", ".join(_call_argument(_parsed_type(a), n) for n, a in enumerate(argtypes))
        methods.append(
            f"static PyObject* call_{index}(PyObject*, PyObject* args) {{\n"
            f"    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != {len(argtypes)}) {{\n"
            f'        PyErr_SetString(PyExc_TypeError, "kernel_{index} takes {len(argtypes)} arguments");\n'
            "        return nullptr;\n    }\n"
            f"    try {{ mstudio_batch_{index}::kernel_{index}({arguments}); }}\n"
            "    catch (std::exception const& e) { PyErr_SetString(PyExc_RuntimeError, e.what()); return nullptr; }\n"
            '    catch (...) { PyErr_SetString(PyExc_RuntimeError, "unhandled C++ exception"); return nullptr; }\n'
            "    Py_RETURN_NONE;\n}\n")
        table.append(f'    {{"kernel_{index}", call_{index}, METH_VARARGS, ""}},')
    return "\n".join([*includes, "", *bodies, _BINDINGS_HEAD, *methods,
                      "static PyMethodDef methods[] = {", *table, "    {nullptr, nullptr, 0, nullptr}};",
                      _BINDINGS_TAIL])


# The bindings: arguments are read as inductor's own bindings read them (a tensor's data pointer through the
# function whose address inductor's loader puts in _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR before importing).
_BINDINGS_HEAD = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

static void* (*tensor_data_ptr)(PyObject* obj) = nullptr;

static int64_t scalar_int64(PyObject* args, Py_ssize_t n) {
    auto value = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, n));
    if (value == -1 && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return value;
}
static uintptr_t scalar_uintptr(PyObject* args, Py_ssize_t n) {
    auto value = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, n));
    if (value == reinterpret_cast<void*>(-1) && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return reinterpret_cast<uintptr_t>(value);
}
static float scalar_float(PyObject* args, Py_ssize_t n) {
    auto value = PyFloat_AsDouble(PyTuple_GET_ITEM(args, n));
    if (value == -1.0 && PyErr_Occurred()) throw std::runtime_error("expected a float argument");
    return static_cast<float>(value);
}
"""

_BINDINGS_TAIL = r"""
static struct PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "kernel", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_kernel(void) {
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    if (!address) {
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not set");
        return nullptr;
    }
    char* end = nullptr;
    errno = 0;
    uintptr_t value = std::strtoull(address, &end, 10);
    if (errno != 0 || end == address || value == 0) {
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not an address");
        return nullptr;
    }
    tensor_data_ptr = reinterpret_cast<void* (*)(PyObject*)>(value);
    return PyModule_Create(&module_definition);
}
"""


class _Batcher:
    """The kernels noted since the last flush, and their builds."""

    def __init__(self, per_kernel: Callable[[Any, Sequence[str], str], Any]):
        self._per_kernel = per_kernel  # inductor's own AsyncCompile.cpp_pybinding
        self._lock = threading.Lock()
        self._pending: list[_Noted] = []

    def note(self, async_compile: Any, argtypes: Sequence[str], source: str) -> Any:
        from torch._inductor.codecache import LambdaFuture

        noted = _Noted(self, async_compile, list(argtypes), source)
        with self._lock:
            self._pending.append(noted)
        return LambdaFuture(noted.result)

    def flush(self) -> None:
        """Split the noted kernels into batches and start building them (on inductor's workers)."""
        from torch._inductor.async_compile import get_compile_threads

        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        for batch in split_into_batches([len(n.source) for n in pending], get_compile_threads()):
            members = [pending[i] for i in batch]
            if len(members) == 1:
                members[0].build_alone()
                continue
            _Batch(members).start()


class _Noted:
    """One kernel of a batch: its callable once built."""

    def __init__(self, batcher: _Batcher, async_compile: Any, argtypes: list[str], source: str):
        self.batcher, self.async_compile, self.argtypes, self.source = batcher, async_compile, argtypes, source
        self.get: Callable[[], Any] | None = None

    def build_alone(self) -> None:
        future = self.batcher._per_kernel(self.async_compile, self.argtypes, self.source)
        self.get = future.result if hasattr(future, "result") else (lambda: future)

    def result(self) -> Any:
        if self.get is None:
            self.batcher.flush()
        return self.get()


class _Batch:
    """Kernels sharing one file: kernel ``i`` is the module's ``kernel_i``."""

    def __init__(self, members: list[_Noted]):
        self.members = members
        self.module: Any = None
        self.load: Callable[[], Any] | None = None

    def start(self) -> None:
        """Start the build (inductor submits it to its workers unless the library is cached on disk)."""
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        try:
            source = batch_source([(m.argtypes, m.source) for m in self.members])
            self.load = CppPythonBindingsCodeCache.load_async(source, device_type="cpu",
                                                              submit_fn=AsyncCompile.submit)
        except Exception as error:
            self._fall_back(error)
            return
        for index, member in enumerate(self.members):
            member.get = functools.partial(self._kernel, index)

    def _kernel(self, index: int) -> Any:
        if self.module is None:
            try:
                self.module = self.load()
            except Exception as error:
                self._fall_back(error)
                return self.members[index].get()
        return getattr(self.module, f"kernel_{index}")

    def _fall_back(self, error: Exception) -> None:
        """Build the members one by one, as inductor does: a real error in a kernel is reported there."""
        log.warning("mstudio: a batch of %d CPU kernels failed to build (%s); building them one by one",
                    len(self.members), error)
        for member in self.members:
            member.build_alone()


_install_lock = threading.Lock()
_depth = 0  # how many callers are inside batched_kernel_builds()
_per_kernel: Callable[..., Any] | None = None  # inductor's own AsyncCompile.cpp_pybinding while it is replaced


@functools.cache
def _async_compile() -> Any:
    """inductor's ``AsyncCompile`` class, or ``None`` when this torch lacks what batching relies on: the names
    below, ``load_async``'s keyword arguments, and the bindings' protocol the batch's own bindings follow (an
    extension module named ``kernel``, tensors read through the function at the address in
    ``_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR``)."""
    try:
        from torch._inductor import async_compile, codecache
    except ImportError:
        return None
    AsyncCompile = getattr(async_compile, "AsyncCompile", None)
    bindings = getattr(codecache, "CppPythonBindingsCodeCache", None)
    if not (hasattr(AsyncCompile, "cpp_pybinding") and hasattr(AsyncCompile, "submit")
            and hasattr(async_compile, "get_compile_threads") and hasattr(codecache, "LambdaFuture")
            and hasattr(bindings, "load_async")):
        return None
    try:
        keywords = inspect.signature(bindings.load_async).parameters
    except (TypeError, ValueError):
        return None
    protocol = (getattr(bindings, "entry_function", None) == "kernel"
                and "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR" in getattr(bindings, "suffix_template", "")
                and {"device_type", "submit_fn"} <= set(keywords))
    return AsyncCompile if protocol else None


def _enabled() -> bool:
    value = os.environ.get(BATCHING_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{BATCHING_ENV}={value!r}: expected 1 (batch CPU kernel builds, the default) or 0")
    return value == "1"


def batching_applies() -> bool:
    """Whether :func:`batched_kernel_builds` batches in this process: not turned off, this torch's internals
    as expected, and more than one compile worker."""
    if not _enabled() or _async_compile() is None:
        return False
    from torch._inductor.async_compile import get_compile_threads

    return get_compile_threads() > 1


@contextlib.contextmanager
def batched_kernel_builds() -> Iterator[None]:
    """While entered, the CPU kernels of every graph inductor loads are built a batch per compile worker (see
    the module's docstring); outside, inductor builds them one by one as usual. Re-entrant and cheap to enter
    (a compiled step enters it on every call; only a call that compiles or loads a graph does anything).

    Raises:
        ValueError: ``MSTUDIO_KERNEL_BATCHING`` is set to something other than ``0`` or ``1``.
    """
    global _depth, _per_kernel
    async_compile = _async_compile() if _enabled() else None
    if async_compile is None:
        yield
        return
    with _install_lock:
        if _depth == 0:
            _per_kernel = per_kernel = async_compile.cpp_pybinding
            batcher = _Batcher(per_kernel)

            def cpp_pybinding(self: Any, argtypes: list[str], source_code: str) -> Any:
                from torch._inductor.async_compile import get_compile_threads

                if get_compile_threads() <= 1 or not batchable(argtypes, source_code):
                    return per_kernel(self, argtypes, source_code)
                return batcher.note(self, argtypes, source_code)

            async_compile.cpp_pybinding = cpp_pybinding
        _depth += 1
    try:
        yield
    finally:
        with _install_lock:
            _depth -= 1
            if _depth == 0:
                async_compile.cpp_pybinding, _per_kernel = _per_kernel, None


def with_batched_kernel_builds(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a ``torch.compile``-d function) called inside :func:`batched_kernel_builds`, so the compile its
    first call runs, any recompile, and loads from the compile cache build CPU kernels in batches."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with batched_kernel_builds():
            return fn(*args, **kwargs)

    return call
