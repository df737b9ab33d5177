"""Inductor's CPU kernels built a batch per compile worker (mstudio.kernel_builds): the batching arithmetic, the
batched file's C++ (built and called for real), and a compiled function whose kernels share one library, equal to
eager, from a cold cache and from a warm one, with a failing batch falling back to inductor's own builds."""

import logging
from pathlib import Path

import pytest
import torch

from mstudio import kernel_builds
from mstudio.kernel_builds import (BATCHING_ENV, batch_source, batchable, batched_kernel_builds, split_into_batches,
                                   with_batched_kernel_builds)

PREFIX = "#include <torch/csrc/inductor/cpp_prefix.h>\n"

# Three kernels written as inductor writes them (its prefix, one extern "C" entry named kernel); the first two
# define a helper of the same name, which the batch's namespaces must keep apart.
SCALE = PREFIX + """
static inline float helper(float x) { return 2.0f * x; }
extern "C" void kernel(const float* in_ptr0, float* out_ptr0, const int64_t n) {
    for (int64_t i = 0; i < n; ++i) { out_ptr0[i] = helper(in_ptr0[i]); }
}
"""
SHIFT = PREFIX + """
static inline float helper(float x) { return x + 1.0f; }
extern "C" void kernel(const float* in_ptr0, float* out_ptr0, const int64_t n) {
    for (int64_t i = 0; i < n; ++i) { out_ptr0[i] = helper(in_ptr0[i]); }
}
"""
AXPY = PREFIX + """
extern "C" void kernel(const float* in_ptr0, float* in_out_ptr0, const float a) {
    #pragma omp simd
    for (int64_t i = 0; i < 5; ++i) { in_out_ptr0[i] += a * in_ptr0[i]; }
}
"""
TYPES_N = ["const float*", "float*", "const int64_t"]
TYPES_A = ["const float*", "float*", "float"]


def test_batches_cover_every_kernel_once_balanced_and_deterministic():
    sizes = [9, 1, 4, 4, 7, 2, 2, 8, 3]
    batches = split_into_batches(sizes, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(batch == sorted(batch) for batch in batches)
    totals = [sum(sizes[i] for i in batch) for batch in batches]
    assert max(totals) - min(totals) <= max(sizes)
    assert split_into_batches(sizes, 2) == batches
    assert split_into_batches(sizes, 1) == [list(range(len(sizes)))]
    assert split_into_batches(sizes, 0) == [list(range(len(sizes)))]
    assert split_into_batches([5, 5], 8) == [[0], [1]]  # never an empty batch


def test_what_may_share_a_file():
    assert batchable(TYPES_N, SCALE) and batchable(TYPES_A, AXPY)  # #include and #pragma are fine
    assert not batchable(TYPES_N, SCALE.replace("static inline", "#define K 2\nstatic inline"))
    assert not batchable(TYPES_N, SCALE + "// calls kernel twice\n")
    assert not batchable(["const float*", "float*", "double"], SCALE)


def test_a_batched_file_builds_and_each_kernel_computes_its_own_result(tmp_path, monkeypatch):
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    source = batch_source([(TYPES_N, SCALE), (TYPES_N, SHIFT), (TYPES_A, AXPY)])
    assert source.count("#include <torch/csrc/inductor/cpp_prefix.h>") == 1
    module = CppPythonBindingsCodeCache.load_async(source, "cpu")()
    x = torch.arange(5, dtype=torch.float32)
    scaled, shifted, acc = torch.empty(5), torch.empty(5), torch.ones(5)
    module.kernel_0(x, scaled, 5)
    module.kernel_1(x, shifted, 5)
    module.kernel_2(x, acc, 0.5)
    torch.testing.assert_close(scaled, 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(shifted, x + 1, rtol=0, atol=0)
    torch.testing.assert_close(acc, 1 + 0.5 * x, rtol=0, atol=0)
    with pytest.raises(TypeError, match="kernel_0 takes 3 arguments"):
        module.kernel_0(x, scaled)
    with pytest.raises(RuntimeError, match="expected an int argument"):
        module.kernel_0(x, scaled, "5")


def test_the_patch_is_scoped_reentrant_and_can_be_turned_off(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile

    inductors = AsyncCompile.cpp_pybinding
    with batched_kernel_builds():
        assert AsyncCompile.cpp_pybinding is not inductors
        with batched_kernel_builds():
            assert AsyncCompile.cpp_pybinding is not inductors
        assert AsyncCompile.cpp_pybinding is not inductors  # still inside the outer one
    assert AsyncCompile.cpp_pybinding is inductors
    with pytest.raises(ZeroDivisionError), batched_kernel_builds():
        1 / 0
    assert AsyncCompile.cpp_pybinding is inductors  # restored on the way out of an exception
    monkeypatch.setenv(BATCHING_ENV, "0")
    with batched_kernel_builds():
        assert AsyncCompile.cpp_pybinding is inductors
    monkeypatch.setenv(BATCHING_ENV, "yes")
    with pytest.raises(ValueError, match="MSTUDIO_KERNEL_BATCHING='yes'"), batched_kernel_builds():
        pass


def test_whether_batching_applies(monkeypatch):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=2):
        assert kernel_builds.batching_applies()
        monkeypatch.setenv(BATCHING_ENV, "0")
        assert not kernel_builds.batching_applies()
    monkeypatch.setenv(BATCHING_ENV, "1")
    with inductor_config.patch(compile_threads=1):
        assert not kernel_builds.batching_applies()  # inductor then builds each kernel as it is defined


def test_a_torch_whose_bindings_differ_is_left_alone(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    inductors = AsyncCompile.cpp_pybinding
    monkeypatch.setattr(CppPythonBindingsCodeCache, "suffix_template", "another protocol for the bindings")
    kernel_builds._async_compile.cache_clear()
    try:
        with batched_kernel_builds():
            assert AsyncCompile.cpp_pybinding is inductors
    finally:
        monkeypatch.undo()
        kernel_builds._async_compile.cache_clear()
    with batched_kernel_builds():
        assert AsyncCompile.cpp_pybinding is not inductors


def _several_kernels(x: torch.Tensor, w: torch.Tensor):
    # each pointwise or reduction stage ends in a matmul (an extern call): inductor cannot fuse across them, so
    # this is 5 C++ kernels
    h = torch.tanh(x * 1.5) @ w
    h = torch.softmax(h, -1) @ w.t()
    h = torch.relu(h - 0.1) @ w
    h = (torch.sigmoid(h) ** 2) @ w.t()
    return h, (h.exp() * 0.5).sum(1)


def _batched_libraries(cache: Path) -> list[str]:
    return [str(path) for path in cache.rglob("*.cpp") if "namespace mstudio_batch_" in path.read_text()]


@pytest.mark.slow
def test_a_compiled_function_shares_libraries_equals_eager_and_reloads_from_the_cache(tmp_path, monkeypatch, caplog):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))
    x, w = torch.randn(24, 16), torch.randn(16, 16)
    expected = _several_kernels(x, w)
    with inductor_config.patch(compile_threads=2):
        torch._dynamo.reset()
        compiled = with_batched_kernel_builds(torch.compile(_several_kernels, fullgraph=True))
        from_batches = compiled(x, w)
        for got, want in zip(from_batches, expected):
            torch.testing.assert_close(got, want)
        batched = _batched_libraries(tmp_path / "cold")
        assert batched, "no kernel was built in a batch"
        kernels_in_batches = sum(Path(path).read_text().count("namespace mstudio_batch_") for path in batched)
        assert kernels_in_batches >= 3
        built = {path.name for path in (tmp_path / "cold").rglob("*.so")}

        # Inductor's own kernel-by-kernel builds compute the same bits (the same compiler and flags).
        monkeypatch.setenv(BATCHING_ENV, "0")
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "alone"))
        torch._dynamo.reset()
        alone = with_batched_kernel_builds(torch.compile(_several_kernels, fullgraph=True))
        for got, want in zip(alone(x, w), from_batches):
            assert torch.equal(got, want)
        assert not _batched_libraries(tmp_path / "alone")
        monkeypatch.setenv(BATCHING_ENV, "1")
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))

        # A second compile of the same graph comes from inductor's caches, its batches too: nothing is built.
        torch._dynamo.reset()
        again = with_batched_kernel_builds(torch.compile(_several_kernels, fullgraph=True))
        for got, want in zip(again(x, w), expected):
            torch.testing.assert_close(got, want)
        assert {path.name for path in (tmp_path / "cold").rglob("*.so")} == built

        # A batch that fails to build falls back to inductor's kernel-by-kernel builds, with a warning.
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "broken"))
        monkeypatch.setattr(kernel_builds, "batch_source", lambda kernels: "this is not C++;\n")
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="mstudio.kernel_builds"):
            fallback = with_batched_kernel_builds(torch.compile(_several_kernels, fullgraph=True))
            for got, want in zip(fallback(x, w), expected):
                torch.testing.assert_close(got, want)
        assert "failed to build" in caplog.text and "building them one by one" in caplog.text
        assert not _batched_libraries(tmp_path / "broken")

        # So does a batch whose file cannot even be written.
        def unwritable(kernels):
            raise ValueError("no file for these")

        caplog.clear()
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unwritable"))
        monkeypatch.setattr(kernel_builds, "batch_source", unwritable)
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="mstudio.kernel_builds"):
            fallback = with_batched_kernel_builds(torch.compile(_several_kernels, fullgraph=True))
            for got, want in zip(fallback(x, w), expected):
                torch.testing.assert_close(got, want)
        assert "no file for these" in caplog.text
    torch._dynamo.reset()
