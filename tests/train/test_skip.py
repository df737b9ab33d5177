"""Skipping a non-finite update (mstudio.train.skip): the same choice eagerly and compiled, and a compiled step
never writes into its inputs."""

import pytest
import torch

from mstudio.train.skip import keep_if, restore_unless_


def test_restore_unless_writes_old_back_only_when_not_ok():
    new, old = [torch.ones(3), torch.full((2, 2), 2.0)], [torch.zeros(3), torch.zeros(2, 2)]
    restore_unless_(torch.tensor(True), new, old)
    assert torch.equal(new[0], torch.ones(3)) and torch.equal(new[1], torch.full((2, 2), 2.0))
    restore_unless_(torch.tensor(False), new, old)
    assert all(torch.equal(n, o) for n, o in zip(new, old))


def test_the_op_refuses_pairs_of_other_shapes_when_traced():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(ValueError, match="differ in shape or dtype"):
            restore_unless_(torch.tensor(True), [torch.ones(3)], [torch.ones(4)])


def test_keep_if_eagerly_selects_and_writes_nothing():
    old = {"a": torch.zeros(3), "b": torch.zeros(2), "same": torch.ones(1)}
    new = {"a": torch.ones(3), "b": torch.full((2,), 5.0), "same": old["same"]}
    for writable in (False, True):
        kept = keep_if(torch.tensor(False), new, old, writable=writable)
        assert torch.equal(kept["a"], old["a"]) and torch.equal(kept["b"], old["b"]) and kept["same"] is old["same"]
        assert torch.equal(new["a"], torch.ones(3)) and torch.equal(new["b"], torch.full((2,), 5.0))
        kept = keep_if(torch.tensor(True), new, old, writable=writable)
        assert torch.equal(kept["a"], new["a"]) and kept["same"] is old["same"]
    with pytest.raises(ValueError, match="structure"):
        keep_if(torch.tensor(True), {"a": new["a"]}, old)


def _step(ok, params, moment, writable):
    # Fresh tensors (one standing for two leaves), a view of an input and an input passed through: only the
    # fresh ones may be written in place, and the shared one must still give each leaf its own old value.
    fresh = params * 2
    new = {"p": fresh, "q": fresh, "view": moment[1:], "same": params}
    old = {"p": params, "q": params + 1, "view": moment[:-1], "same": params}
    return keep_if(ok, new, old, writable=writable)


@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("writable", [True, False])
def test_compiled_keep_if_equals_eager_and_leaves_inputs_alone(ok, writable):
    params, moment = torch.arange(4.0), torch.arange(5.0) * 10
    want = _step(torch.tensor(ok), params, moment, writable)
    torch._dynamo.reset()
    got = torch.compile(_step, fullgraph=True)(torch.tensor(ok), params, moment, writable)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(params, torch.arange(4.0)) and torch.equal(moment, torch.arange(5.0) * 10)


@pytest.mark.parametrize("writable", [True, False])
def test_only_writable_fresh_tensors_go_through_the_op(writable):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_step, backend=record, fullgraph=True)(torch.tensor(False), torch.arange(4.0), torch.arange(5.0),
                                                         writable)
    calls = [node for node in graphs[0].graph.nodes if node.target is torch.ops.mstudio.restore_unless_.default]
    if not writable:
        assert not calls
        return
    (call,) = calls
    new_arg = call.args[1] if len(call.args) > 1 else call.kwargs["new"]
    assert len(new_arg) == 1  # "p" only: "q" shares its tensor, "view" is a view, "same" is unchanged
