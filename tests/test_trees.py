"""mstudio.trees: optree's results, eagerly and while torch.compile traces (its plain-Python path)."""

import collections
from typing import NamedTuple

import optree
import pytest
import torch

from mstudio import trees


class Pair(NamedTuple):
    first: object
    second: object


def example():
    t = lambda *shape: torch.randn(*shape)  # noqa: E731
    # keys inserted out of order: leaves come in sorted key order, the rebuilt dict keeps insertion order
    return Pair({"z": t(2), "a": [t(1), None, (t(3), 2.5)], "m": {"y": t(1), "b": None}}, (t(2, 2), None))


def traced(fn):
    """``fn`` run by dynamo (backend eager: no inductor), so the compiling branch is the one that runs."""
    return torch.compile(fn, backend="eager", fullgraph=True)


@pytest.mark.parametrize("none_is_leaf", [False, True])
def test_flatten_gives_optree_leaves_in_optree_order_when_traced(none_is_leaf):
    tree = example()
    want = optree.tree_leaves(tree, none_is_leaf=none_is_leaf)

    def leaves_and_rebuilt(tree):
        leaves, spec = trees.tree_flatten(tree, none_is_leaf=none_is_leaf)
        doubled = [x * 2 if isinstance(x, torch.Tensor) else x for x in leaves]
        return leaves, trees.tree_unflatten(spec, doubled), isinstance(spec, optree.PyTreeSpec)

    for run, by_optree in ((leaves_and_rebuilt, True), (traced(leaves_and_rebuilt), False)):
        leaves, rebuilt, used_optree = run(tree)
        assert used_optree == by_optree
        assert len(leaves) == len(want)
        assert all(a is b or (isinstance(a, torch.Tensor) and torch.equal(a, b)) for a, b in zip(leaves, want))
        assert isinstance(rebuilt, Pair) and list(rebuilt.first) == ["z", "a", "m"]  # insertion order kept
        assert list(rebuilt.first["m"]) == ["y", "b"] and rebuilt.second[1] is None
        assert optree.tree_structure(rebuilt, none_is_leaf=none_is_leaf) == optree.tree_structure(
            tree, none_is_leaf=none_is_leaf)
        torch.testing.assert_close(rebuilt.first["a"][2][0], 2 * tree.first["a"][2][0])
        assert rebuilt.first["a"][2][1] == 2.5


def test_map_matches_optree_and_checks_structures_when_traced():
    tree = optree.tree_map(lambda x: x if isinstance(x, torch.Tensor) else torch.tensor(x), example())
    other = optree.tree_map(torch.ones_like, tree)
    want = optree.tree_map(torch.add, tree, other)
    got = traced(lambda a, b: trees.tree_map(torch.add, a, b))(tree, other)
    assert optree.tree_structure(got) == optree.tree_structure(want)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want)))
    with pytest.raises(Exception, match="different structures"):
        traced(lambda a, b: trees.tree_map(torch.add, a, b))({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_other_containers_go_to_optree():
    ordered = collections.OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    assert isinstance(trees.tree_flatten(ordered)[1], optree.PyTreeSpec)
    doubled = traced(lambda tree: trees.tree_map(lambda x: x * 2, tree))(ordered)
    assert type(doubled) is collections.OrderedDict and list(doubled) == ["b", "a"]  # optree keeps its order
    assert torch.equal(doubled["b"], torch.full((1,), 2.0))
