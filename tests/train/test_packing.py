"""Packing the optimizer's tensors into flat buffers (mstudio.train.packing): exact round trips, the same
update as tensor by tensor, and no packing where it would be wrong."""

import optree
import pytest
import torch

import mstudio
from mstudio.optim import GradientTransformation
from mstudio.train.packing import ALONE_FROM, Packing, packing_for


def _params():
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "head.bias": torch.randn(5, dtype=torch.float64),
        "value.weight": torch.randn(2, 6),  # gets no gradient
        "head.weight": torch.randn(5, 7, dtype=torch.float64),
        "norm.weight": torch.randn(4),
    }


def _grads(params, scale=1.0):
    return {name: None if name == "value.weight" else scale * torch.randn_like(p) for name, p in params.items()}


def test_pack_groups_by_dtype_and_unpack_restores_every_tensor_in_its_order():
    params = _params()
    packing = Packing(_grads(params))
    flat = packing.pack(params)
    assert sorted(flat) == ["float32@cpu", "float64@cpu"]
    assert flat["float32@cpu"].shape == (4 * 27 + 4,) and flat["float64@cpu"].shape == (5 + 35,)
    assert torch.equal(flat["float64@cpu"][:5], params["head.bias"])  # the parameters' order within a group
    back = packing.unpack(flat, params)
    assert list(back) == list(params)
    assert back["value.weight"] is params["value.weight"]  # not packed: passed through
    for name, p in params.items():
        assert back[name].shape == p.shape and back[name].dtype == p.dtype and torch.equal(back[name], p)


def test_a_large_tensor_is_a_group_of_its_own_and_packed_as_it_is():
    params = {"big": torch.randn(2, ALONE_FROM // 2), "small": torch.randn(3), "bias": torch.randn(2)}
    packing = Packing(params)
    assert packing.groups == {"big": ["big"], "float32@cpu": ["small", "bias"]}
    flat = packing.pack(params)
    assert flat["big"] is params["big"]
    updated = {key: value * 2 for key, value in flat.items()}
    back = packing.unpack(updated, params)
    assert back["big"] is updated["big"]
    assert all(torch.equal(back[name], params[name] * 2) for name in params)


def test_unpacked_tensors_are_copies_not_views_of_the_buffer():
    # Views of the buffer would make AOTAutograd replay their view chains while tracing (20 s -> 3 s on tiny).
    params = _params()
    packing = Packing(_grads(params))
    flat = packing.pack(params)
    back = packing.unpack(flat, params)
    buffers = {value.untyped_storage().data_ptr() for value in flat.values()}
    storages = [back[name].untyped_storage().data_ptr() for name in packing.names if name != "value.weight"]
    assert len(set(storages)) == len(storages) and not buffers & set(storages)


def test_pack_state_packs_only_the_parameter_shaped_parts_and_unpack_state_inverts_it():
    params = _params()
    optimizer = mstudio.optim.adamw(1e-3, warmup_steps=2, clip_norm=1.0)
    state = optimizer.init(params)
    state = optimizer.update(_grads(params), state, params)[1]  # nonzero moments
    packing = Packing(_grads(params))
    packed = packing.pack_state(state)
    adam = packed.inner_state[1]
    assert sorted(adam.mu) == ["float32@cpu", "float64@cpu"] and adam.count is state.inner_state[1].count
    assert packed.hyperparams is not state.hyperparams and packed.hyperparams.keys() == state.hyperparams.keys()
    back = packing.unpack_state(packed, state)
    assert optree.tree_structure(back, none_is_leaf=True) == optree.tree_structure(state, none_is_leaf=True)
    for got, want in zip(optree.tree_leaves(back), optree.tree_leaves(state)):
        assert got.shape == want.shape and torch.equal(got, want)


def _run(optimizer, packed: bool, steps: int = 5, scale: float = 1.0):
    params = _params()
    state = optimizer.init(params)
    for step in range(steps):
        torch.manual_seed(100 + step)
        grads = _grads(params, scale)
        if packed:
            packing = Packing(grads)
            updates, new = optimizer.update(packing.pack(grads), packing.pack_state(state), packing.pack(params))
            params = packing.unpack(mstudio.optim.apply_updates(packing.pack(params), updates), params)
            state = packing.unpack_state(new, state)
        else:
            updates, state = optimizer.update(grads, state, params)
            params = mstudio.optim.apply_updates(params, updates)
    return params, state


def test_adamw_on_packed_buffers_is_bit_exact_without_clipping():
    optimizer = mstudio.optim.adamw(1e-2, weight_decay=0.1, warmup_steps=3)
    for got, want in zip(*(optree.tree_leaves(_run(optimizer, packed)) for packed in (True, False))):
        assert torch.equal(got, want)


def test_adamw_on_packed_buffers_matches_with_clipping_up_to_the_norms_rounding():
    # The clip factor comes from one norm over a buffer instead of the norm of per-tensor norms: the same
    # number up to float rounding, which then scales every gradient.
    optimizer = mstudio.optim.adamw(1e-2, weight_decay=0.1, warmup_steps=3, clip_norm=0.5)
    packed, plain = (_run(optimizer, packed, scale=10.0) for packed in (True, False))
    for got, want in zip(optree.tree_leaves(packed), optree.tree_leaves(plain)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(packed[0]["value.weight"] + 0, _params()["value.weight"] + 1)  # sanity: compared
    assert torch.equal(packed[0]["value.weight"], _params()["value.weight"])  # no gradient: untouched


def test_packing_only_for_elementwise_optimizers_and_contiguous_parameters():
    params = _params()
    grads = _grads(params)
    assert isinstance(packing_for(mstudio.optim.adamw(1e-3, clip_norm=1.0), grads, params), Packing)
    per_tensor = GradientTransformation(lambda p: (), lambda g, s, p=None: (g, s))  # elementwise unknown
    assert packing_for(per_tensor, grads, params) is None
    assert packing_for(mstudio.optim.chain(mstudio.optim.identity(), per_tensor), grads, params) is None
    transposed = {**params, "head.weight": params["head.weight"].t().contiguous().t()}
    assert packing_for(mstudio.optim.adamw(1e-3), grads, transposed) is None
    # A parameter without a gradient may be laid out any way: it is not packed.
    assert packing_for(mstudio.optim.adamw(1e-3), grads, {**params, "value.weight": params["value.weight"].t()})


@pytest.mark.parametrize("transform", ["identity", "clip", "adam", "lr", "decay"])
def test_the_elementwise_blocks_say_so(transform):
    blocks = {
        "identity": mstudio.optim.identity(),
        "clip": mstudio.optim.clip_by_global_norm(1.0),
        "adam": mstudio.optim.scale_by_adam(),
        "lr": mstudio.optim.scale_by_learning_rate(1e-3),
        "decay": mstudio.optim.add_decayed_weights(0.1, 1e-3),
    }
    assert blocks[transform].elementwise


def _traced_step_graph(optimizer, pack=True):
    """The dynamo graph of a TinyPolicy step with ``optimizer`` (traced only, not compiled)."""
    import losses
    from mstudio.data.synthetic import random_batch
    from mstudio.models import TinyPolicy
    from mstudio.train.step import reached_parameters, train_step_function

    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    batch = random_batch(2, 4, 16, seed=0)
    state = mstudio.init_state(policy, optimizer, batch_size=2)
    reached = reached_parameters(policy, losses.behavior_clone, state, batch)
    apply_fn, _, _ = mstudio.functionalize(policy)
    step = train_step_function(apply_fn, losses.behavior_clone, optimizer, reached, pack=pack)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    traced_state, _ = torch.compile(step, backend=record, fullgraph=True)(state, batch)
    eager_state, _ = step(state, batch)
    return graphs[0], reached, traced_state, eager_state


def test_a_traced_step_packs_an_elementwise_optimizer_and_not_another():
    adamw = mstudio.optim.adamw(1e-3, clip_norm=1.0)
    graph, reached, traced, eager = _traced_step_graph(adamw)
    cats = [node for node in graph.graph.nodes if node.target is torch.cat]
    # One concatenation each of the gradients, the parameters and Adam's two moments (all float32), of every
    # reached tensor but the large ones (the 8641-way head's weight), which are updated where they are.
    alone = [name for name in reached if traced.params[name].numel() >= ALONE_FROM]
    assert alone == ["pi_buttons.weight"]
    assert [len(node.args[0]) for node in cats] == [len(reached) - len(alone)] * 4
    for name in traced.params:
        torch.testing.assert_close(traced.params[name], eager.params[name], rtol=1e-5, atol=1e-7)
    assert optree.tree_structure(traced) == optree.tree_structure(eager)

    per_tensor = mstudio.optim.chain(adamw, GradientTransformation(lambda p: (), lambda g, s, p=None: (g, s)))
    graph, *_ = _traced_step_graph(per_tensor)
    assert not [node for node in graph.graph.nodes if node.target is torch.cat]


def test_packing_can_be_turned_off():
    graph, *_ = _traced_step_graph(mstudio.optim.adamw(1e-3, clip_norm=1.0), pack=False)
    assert not [node for node in graph.graph.nodes if node.target is torch.cat]
    from mstudio.models import TinyPolicy

    with pytest.raises(TypeError, match="pack_optimizer must be a bool"):
        mstudio.make_train_step(TinyPolicy(hidsize=16, image_size=16), lambda b, l, p: {"loss": 0},
                                mstudio.optim.adamw(1e-3), pack_optimizer="no")
