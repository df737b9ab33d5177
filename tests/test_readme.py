"""The README's Python snippets run as written, and what they claim holds (learning within a few steps)."""

import re
from pathlib import Path

import pytest
import torch

import mstudio
from mstudio.models import TinyPolicy

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(index: int) -> dict:
    namespace: dict = {}
    exec(compile(_snippets()[index], f"README.md python snippet {index}", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_readme_has_the_four_snippets():
    assert len(_snippets()) == 4


def test_functional_snippet_learns_and_sets_hyperparams():
    ns = _run(0)
    seen = ns["losses_seen"]
    assert len(seen) == 6 and seen[-1] < seen[0] * 0.9
    assert ns["state"].hyperparams["bc_weight"].item() == 0.5
    assert ns["optimizer"].learning_rate(ns["state"].opt_state).item() == 5e-4


def test_minestudio_snippet_learns_and_leaves_the_weights_in_the_policy():
    ns = _run(1)
    history = [entry["train/loss"] for entry in ns["model"].history]
    assert len(history) == 6 and history[-1] < history[0] * 0.9
    trained = ns["model"].mine_policy.state_dict()
    assert all(torch.equal(trained[name], value) for name, value in ns["model"].state.params.items())


@pytest.mark.slow
def test_the_objective_written_as_the_readme_shows_compiles_and_reweights_without_recompiling():
    objective = _run(2)["objective"]
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, batch_size=2, objective=objective)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=True)
    from mstudio.data.synthetic import random_batch

    torch._dynamo.reset()
    state, first = step(state, random_batch(2, 4, 16, seed=0))
    state = mstudio.set_hyperparams(state, v_w=0.5, learning_rate=5e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        state, second = step(state, random_batch(2, 4, 16, seed=1, start=4))
    assert torch.isfinite(second["loss"]) and second["value_l2"] >= 0
    assert state.skipped_updates.item() == 0


def test_research_snippet_reports_every_term_and_a_noise_scale():
    ns = _run(3)
    report = ns["diagnose"](ns["policy"], ns["terms"], ns["state"], ns["batch"])
    assert set(report) >= {"grad_norm/camera", "grad_norm/entropy", "grad_cosine/camera__buttons"}
    assert all(torch.isfinite(v) for k, v in report.items() if k.startswith("grad_norm/"))
    assert ns["per_sample"]["pi_camera.weight"].shape[0] == 4
