"""Donation (``mstudio.optim.donated``): the same updates written into the caller's tensors, never under compile."""

import optree
import torch

import mstudio
from mstudio.optim import adamw, apply_updates, donated, is_donated


def _problem():
    torch.manual_seed(0)
    params = {"w": torch.randn(5, 3), "b": torch.randn(4), "frozen_by_loss": torch.randn(2)}
    grads = [{"w": torch.randn(5, 3), "b": torch.randn(4) * 10, "frozen_by_loss": None} for _ in range(6)]
    return params, grads


def _run(donate: bool):
    params, grads = _problem()
    optimizer = adamw(1e-2, weight_decay=0.1, warmup_steps=3, clip_norm=0.5)
    state = optimizer.init(params)
    history = []
    for g in grads:
        g = {k: None if v is None else v.clone() for k, v in g.items()}
        if donate:
            with donated():
                updates, new_state = optimizer.update(g, state, params)
                new_params = apply_updates(params, updates)
            # Written in place: the caller's tensors now hold the new values.
            assert all(new_params[k] is params[k] for k in params)
            assert all(a is b for a, b in zip(optree.tree_leaves(new_state.inner_state[1].mu),
                                             optree.tree_leaves(state.inner_state[1].mu)))
        else:
            updates, new_state = optimizer.update(g, state, params)
            new_params = apply_updates(params, updates)
        params, state = new_params, new_state
        history.append({k: v.clone() for k, v in params.items()})
    return history, state


def test_donated_adamw_matches_the_pure_one_within_a_rounding():
    pure, pure_state = _run(donate=False)
    inplace, inplace_state = _run(donate=True)
    for a, b in zip(pure, inplace):
        for name in a:
            # The decay is applied in torch's order in place (p * (1 - lr wd) + u) and as an exact difference
            # in the pure chain: equal except, rarely, one ulp where a step exceeds the weight itself.
            torch.testing.assert_close(b[name], a[name], rtol=2e-7, atol=1e-9)
    for a, b in zip(optree.tree_leaves(pure_state), optree.tree_leaves(inplace_state)):
        torch.testing.assert_close(b, a, rtol=2e-7, atol=1e-9)


def test_a_parameter_without_gradient_stays_bit_identical_when_donated():
    history, _ = _run(donate=True)
    params, _ = _problem()
    assert torch.equal(history[-1]["frozen_by_loss"], params["frozen_by_loss"])


def test_without_donation_the_inputs_are_untouched():
    params, grads = _problem()
    optimizer = adamw(1e-2, weight_decay=0.1, clip_norm=0.5)
    state = optimizer.init(params)
    before = optree.tree_map(torch.clone, (params, grads[0], state), none_is_leaf=False)
    updates, _ = optimizer.update(grads[0], state, params)
    apply_updates(params, updates)
    after = (params, grads[0], state)
    assert all(optree.tree_leaves(optree.tree_map(torch.equal, before, after)))


def test_is_donated_is_false_outside_the_block_and_while_compiling():
    assert not is_donated()
    with donated():
        assert is_donated()
        seen = torch.compile(lambda x: x + 1 if is_donated() else x - 1, backend="eager", fullgraph=True)(
            torch.zeros(()))
    assert not is_donated()
    assert seen.item() == -1  # traced as pure: a compiled step never writes its inputs


def test_donated_is_exported():
    assert mstudio.optim.donated is donated


def _against_torch(torch_kwargs: dict) -> None:
    """Fifteen steps of donated ``adamw`` and of ``torch.optim.AdamW(**torch_kwargs)`` + ``LambdaLR`` warm-up +
    ``clip_grad_norm_`` (MineStudio's optimizer) on the same gradients: every parameter identical after each."""
    torch.manual_seed(0)
    params = {f"p{i}": torch.randn(*shape) for i, shape in enumerate([(64, 32), (32,), (300, 16), (3, 3, 3, 8)])}
    reference = [torch.nn.Parameter(p.clone()) for p in params.values()]
    torch_opt = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.1, **torch_kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda k: min((k + 1) / 10, 1.0))
    optimizer = adamw(1e-3, weight_decay=0.1, warmup_steps=10, clip_norm=1.0)
    state = optimizer.init(params)
    for step in range(15):  # through the warm-up's end, clipping on every third step
        grads = {k: torch.randn_like(v) * (10.0 if step % 3 == 0 else 0.01) for k, v in params.items()}
        for p, g in zip(reference, grads.values()):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(reference, 1.0)
        torch_opt.step()
        schedule.step()
        with donated():
            updates, state = optimizer.update(grads, state, params)
            params = apply_updates(params, updates)
        assert all(torch.equal(ours, theirs.detach()) for ours, theirs in zip(params.values(), reference)), step


def test_donated_adamw_on_cpu_is_torchs_fused_adamw_bit_for_bit():
    _against_torch({"fused": True})


def test_donated_adamw_without_the_fused_kernel_is_torchs_single_tensor_adamw_bit_for_bit(monkeypatch):
    # Where torch has no fused kernel for the tensors (another device or dtype), the update is torch's own
    # sequence of in-place foreach operations: MineStudio's optimizer on CPU (single-tensor) exactly.
    import mstudio.optim.alias as alias

    monkeypatch.setattr(alias, "_fused_groups", lambda *lists: None)
    _against_torch({"foreach": False})


def test_the_fused_kernel_is_used_only_where_every_tensor_fits_it():
    from mstudio.optim.alias import _fused_groups

    a, b = torch.zeros(3), torch.zeros(2, dtype=torch.float64)
    assert _fused_groups([a, b], [a, b]) == {(a.device, torch.float32): [0], (b.device, torch.float64): [1]}
    assert _fused_groups([a], [b[:1]]) is None  # a gradient of another dtype than its parameter
    assert _fused_groups([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)]) is None
    assert _fused_groups([a], [torch.zeros(3).to_sparse()]) is None
    assert _fused_groups([a.to("meta")], [a.to("meta")]) is None
    weight = torch.zeros(4, 3, 2, 2)
    assert _fused_groups([weight], [weight.contiguous(memory_format=torch.channels_last)]) is None


def test_a_channels_last_gradient_is_paired_with_its_own_elements():
    # torch 2.13's fused kernel walks memory in order: given a gradient with other strides than its parameter (a
    # convolution's weight, eagerly) it updates the wrong elements. Donated adamw passes gradients contiguous.
    torch.manual_seed(0)
    param = torch.randn(4, 3, 5, 5)
    grad = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    reference = torch.nn.Parameter(param.clone())
    reference.grad = grad.clone(memory_format=torch.preserve_format)
    torch.optim.AdamW([reference], lr=1e-2, foreach=False).step()
    optimizer = adamw(1e-2)
    params = {"w": param}
    with donated():
        updates, _ = optimizer.update({"w": grad}, optimizer.init(params), params)
        params = apply_updates(params, updates)
    torch.testing.assert_close(params["w"], reference.detach(), rtol=1e-6, atol=1e-7)
