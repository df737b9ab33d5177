"""Compile checks shared by the core and policy tests."""

import torch

import mstudio
from mstudio.train.step import train_step_function, value_and_grad_func


def assert_step_is_one_graph(policy, optimizer, objective, batch, no_grad_prefix: str) -> None:
    """``torch._dynamo.explain`` the traceable train step: exactly one graph and no breaks.

    Parameters whose names start with ``no_grad_prefix`` (the value head under BC) are treated as unreached.
    """
    state = mstudio.init_state(policy, optimizer, batch_size=batch["timestamp"].shape[0], objective=objective)
    apply_fn, _, _ = mstudio.functionalize(policy)
    reached = frozenset(k for k in state.params if not k.startswith(no_grad_prefix))
    fn = train_step_function(apply_fn, objective, optimizer, reached, value_and_grad_func)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(state, batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
