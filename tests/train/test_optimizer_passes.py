"""The compiled step's optimizer update passes over each large tensor twice: once for the gradient norm, once for
the moments, the parameter and the update's norm together (mstudio.optim.adam: the direction recomputes the
moments, since inductor would not fuse its loop into the loop that writes them; clipping reuses the step's
gradient norm, mstudio.optim.known_global_norm; the bias corrections are computed once)."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import mstudio
from mstudio import trees
from mstudio.compile import compiled_call
from mstudio.optim import global_norm
from mstudio.optim.adam import computed_once
from mstudio.train.packing import ALONE_FROM, packing_for
from mstudio.train.step import _update_pure


def _setup(clip_norm):
    torch.manual_seed(0)
    params = {"big": torch.randn(ALONE_FROM), "small": torch.randn(3, 5), "bias": torch.randn(5)}
    grads = {name: 0.1 * torch.randn_like(p) for name, p in params.items()}
    optimizer = mstudio.optim.adamw(1e-2, weight_decay=0.1, clip_norm=clip_norm)
    state = optimizer.init(params)
    state = optimizer.update(grads, state, params)[1]  # nonzero moments
    return optimizer, params, grads, state


def _loops_over(size: int, code: str) -> list[str]:
    """The bodies of the generated C++ loops ``for(int64_t x0=0; x0<size; ...)`` in ``code``."""
    bodies = []
    for match in re.finditer(rf"for\(int64_t x0=[^;]*; x0<static_cast<int64_t>\({size}L\);", code):
        start = code.index("{", match.end())
        depth, end = 0, start
        for end in range(start, len(code)):
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            if depth == 0:
                break
        bodies.append(code[start:end + 1])
    return bodies


def _update(optimizer, params, grads, opt_state, packed):
    """The optimizer part of the compiled step (``train_step_parts``' update): packed gradients, their norm,
    the update with the non-finite guard."""
    packing = packing_for(optimizer, grads, params) if packed else None
    if packing is not None:
        grads = packing.pack(grads)
    grad_norm = global_norm(grads)
    return _update_pure(optimizer, grads, opt_state, params, torch.tensor(1.0), grad_norm, packing, True)


def test_computed_once_is_a_copy_of_its_input():
    x = torch.randn(2, dtype=torch.float64)
    y = computed_once(x)
    assert torch.equal(y, x) and y.dtype == x.dtype and y.data_ptr() != x.data_ptr()


@pytest.mark.slow
def test_the_compiled_update_with_clipping_reads_a_large_tensor_twice_and_matches_eager():
    optimizer, params, grads, state = _setup(clip_norm=1.0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: _update(optimizer, *args, packed=True), fullgraph=True)
    (new_params, new_state, finite), codes = run_and_get_code(compiled, params, grads, state)
    loops = _loops_over(ALONE_FROM, "\n".join(codes))
    # One loop for the gradient norm (clipping reuses the step's), one for the moments, the parameter and the
    # update's norm, reading the step's inputs only (g, m, v, p) and writing m, v, p. Before the moments were
    # recomputed, a third: the parameter's loop read the new moments back from memory (10 accesses, not 8); with
    # the norm taken twice, the update's loop took the second one and left the update's norm a loop of its own.
    assert len(loops) == 2, loops
    assert not any(re.search(r"loadu\(out_ptr", body) for body in loops), loops
    assert sum(len(re.findall(r"\b(loadu|store)\(", body)) for body in loops) == 8, loops
    assert [body.count("cascade_sum_combine") for body in loops] == [1, 1], loops  # each norm once
    # Adam's bias corrections are computed once (mstudio::computed_once), not once per 16 elements in the loop
    assert not any("pow" in body for body in loops), loops
    assert bool(finite)
    want_params, want_state, _ = _update(optimizer, params, grads, state, packed=False)
    for got, want in zip(trees.tree_leaves(new_state) + list(new_params.values()),
                         trees.tree_leaves(want_state) + list(want_params.values())):
        # inductor's arithmetic rounds a little differently from eager kernels' (and with clipping, the packed
        # buffer's norm from the norm of per-tensor norms)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _many_groups():
    """A big tensor of a size of its own, 8 more of ALONE_FROM elements and 60 small ones (packed into one
    buffer: the copies in and out are nodes of their own), so the update's loops over the big tensor lie more
    than 64 nodes apart in the graph, as in VPT's step."""
    torch.manual_seed(0)
    params = {"big": torch.randn(ALONE_FROM + 16)}
    params.update({f"w{i}": torch.randn(ALONE_FROM) for i in range(8)})
    params.update({f"b{i}": torch.randn(7) for i in range(60)})
    grads = {name: 0.1 * torch.randn_like(p) for name, p in params.items()}
    optimizer = mstudio.optim.adamw(1e-2, weight_decay=0.1, clip_norm=1.0)
    state = optimizer.update(grads, optimizer.init(params), params)[1]
    return optimizer, params, grads, state


@pytest.mark.slow
def test_with_many_groups_the_update_still_reads_a_large_tensor_twice_under_compiled_call():
    optimizer, params, grads, state = _many_groups()
    update = torch.compile(lambda *args: _update(optimizer, *args, packed=True), fullgraph=True)
    # the code of these compiles, not a cached one
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        _, codes = run_and_get_code(compiled_call(update), params, grads, state)
        loops = _loops_over(ALONE_FROM + 16, "\n".join(codes))
        # mstudio.fusion_choices: the moments' and the parameter's loops fuse although they lie far apart
        assert len(loops) == 2, loops
        assert sum(len(re.findall(r"\b(loadu|store)\(", body)) for body in loops) == 8, loops
        torch._dynamo.reset()
        _, codes = run_and_get_code(update, params, grads, state)  # inductor's own heuristic: more passes
        assert len(_loops_over(ALONE_FROM + 16, "\n".join(codes))) > 2
