"""The optimizer building blocks: clipping, chain, apply_updates, global_norm."""

import pytest
import torch

import mstudio.optim as optim


def test_clip_by_global_norm_matches_clip_grad_norm_():
    grads = {"a": torch.randn(5, 3), "b": torch.randn(7), "none": None}
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in (grads["a"], grads["b"])]
    for p, g in zip(params, (grads["a"], grads["b"])):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, 0.5)
    clipped, _ = optim.clip_by_global_norm(0.5).update(grads, (), None)
    assert torch.equal(optim.global_norm(grads), total)
    assert torch.equal(clipped["a"], params[0].grad) and torch.equal(clipped["b"], params[1].grad)
    assert clipped["none"] is None


def test_clip_leaves_small_gradients_alone():
    grads = {"a": torch.full((4,), 0.01)}
    clipped, _ = optim.clip_by_global_norm(10.0).update(grads, (), None)
    torch.testing.assert_close(clipped["a"], grads["a"])


def test_chain_threads_states_and_exposes_the_learning_rate():
    tx = optim.chain(optim.identity(), optim.adamw(0.5, warmup_steps=2))
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    assert tx.learning_rate(state).item() == 0.25
    _, state = tx.update({"w": torch.ones(2)}, state, params)
    assert state[1].count.item() == 1
    assert tx.learning_rate(state).item() == 0.5
    with pytest.raises(ValueError, match="more than one transformation with a learning rate"):
        optim.chain(optim.adamw(0.1), optim.adamw(0.1))


def test_apply_updates_checks_structure():
    with pytest.raises(ValueError, match="structure"):
        optim.apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_known_global_norm_is_reused_for_the_same_unwritten_tensors(monkeypatch):
    grads = {"a": torch.randn(3, 4), "b": None, "c": torch.randn(5)}
    norm = optim.global_norm(grads)
    torch.testing.assert_close(norm, torch.cat([grads["a"].flatten(), grads["c"]]).norm())
    computed = []
    real_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda leaves: computed.append(1) or real_norm(leaves))
    marker = torch.tensor(123.0)
    with optim.known_global_norm(grads, marker):
        assert optim.global_norm(grads) is marker and computed == []  # reused, nothing computed
        assert optim.global_norm({"a": grads["a"]}) is not marker  # other leaves: computed
        grads["c"].mul_(2)  # written in place (a donated clip): the known norm is stale
        torch.testing.assert_close(optim.global_norm(grads), torch.cat([grads["a"].flatten(), grads["c"]]).norm())
    assert len(computed) == 2
    assert optim.global_norm(grads) is not marker  # outside the block: computed again


def test_known_global_norm_is_reused_while_traced_for_the_same_tensors():
    # Traced there is no version to compare (dynamo reads an unknown tensor's _version as data-dependent): the
    # same tensor objects are enough, as GradientTransformations do not write into their inputs.
    def norms(a, c, marker):
        grads = {"a": a, "b": None, "c": c}
        with optim.known_global_norm(grads, marker):
            same = optim.global_norm(grads)
            other = optim.global_norm({"a": a})
        return same, other, optim.global_norm(grads)

    a, c, marker = torch.randn(3, 4), torch.randn(5), torch.tensor(123.0)
    torch._dynamo.reset()
    same, other, after = torch.compile(norms, backend="eager", fullgraph=True)(a, c, marker)
    assert torch.equal(same, marker)
    torch.testing.assert_close(other, a.norm())
    torch.testing.assert_close(after, torch.cat([a.flatten(), c]).norm())
    assert not optim.transforms._TRACED_KNOWN_NORMS  # the traced block left nothing behind
