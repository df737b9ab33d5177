"""mstudio.compat (MineStudio's MineLightning and callbacks on the functional step), VPT's pi_head API and
get_action. Everything runs eagerly except the one slow test, which compiles TinyPolicy once."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
import mstudio
from mstudio import distributions
from mstudio.actions import agent_to_env, env_to_agent
from mstudio.compat import (BehaviorCloneCallback, KLDivergenceCallback, MineLightning, ObjectiveCallback,
                            callbacks_to_objective)
from mstudio.data import EpisodeContinuous, EpisodeStore, fill_store, make_loader, random_batch
from mstudio.models import TinyPolicy, VPTPolicy

HYPER = dict(learning_rate=1e-3, weight_decay=0.1, warmup_steps=2)


def batches(n, *, seed=0):
    """``n`` batches of B=2, T=4 frames; the rows of batch k continue those of batch k - 1."""
    return [random_batch(2, 4, 64, seed=seed + k, start=4 * k) for k in range(n)]


def minestudio_style(batch):
    """``batch`` as a MineStudio loader yields it: no mask, plus entries that are not tensors."""
    out = {key: value for key, value in batch.items() if key != "mask"}
    return {**out, "episode": ["ep-a", "ep-b"], "text": ["chop a tree", "mine"]}


def functional_run(policy, objective, batch_list, steps, clip=None):
    """The reference: the functional API over ``batch_list`` cycled for ``steps`` updates (eager)."""
    optimizer = mstudio.optim.adamw(HYPER["learning_rate"], weight_decay=HYPER["weight_decay"],
                                    warmup_steps=HYPER["warmup_steps"], clip_norm=clip)
    state = mstudio.init_state(policy, optimizer, batch_size=2)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False)
    for k in range(steps):
        state, metrics = step(state, batch_list[k % len(batch_list)])
    return state, metrics


def tiny_vpt():
    torch.manual_seed(0)
    return VPTPolicy.from_preset("tiny")


def tiny_policy():
    torch.manual_seed(0)
    return TinyPolicy(hidsize=32)


class UserBC(ObjectiveCallback):
    """The BehaviorCloneCallback body from MineStudio's documentation, pasted as a user's own callback."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def __call__(self, batch, batch_idx, step_name, latents, mine_policy):
        assert 'agent_action' in batch, "key `agent_action` is required for behavior cloning."
        agent_action = batch['agent_action']
        pi_logits = latents['pi_logits']
        log_prob = mine_policy.pi_head.logprob(agent_action, pi_logits, return_dict=True)
        entropy = mine_policy.pi_head.entropy(pi_logits, return_dict=True)
        camera_mask = (agent_action['camera'] != 60).float().squeeze(-1)
        global_mask = batch.get('mask', torch.ones_like(camera_mask))
        logp_camera = (log_prob['camera'] * global_mask * camera_mask).sum(-1)
        logp_buttons = (log_prob['buttons'] * global_mask).sum(-1)
        entropy_camera = (entropy['camera'] * global_mask * camera_mask).sum(-1)
        entropy_buttons = (entropy['buttons'] * global_mask).sum(-1)
        camera_loss, button_loss = -logp_camera, -logp_buttons
        bc_loss = camera_loss + button_loss
        entropy = entropy_camera + entropy_buttons
        return {
            'loss': bc_loss.mean() * self.weight,
            'camera_loss': camera_loss.mean(),
            'button_loss': button_loss.mean(),
            'entropy': entropy.mean(),
            'bc_weight': self.weight,
        }


class ValueL2(ObjectiveCallback):
    """An L2 penalty on a weight read through ``mine_policy`` (the value head, which BC never reaches)."""

    def __call__(self, batch, batch_idx, step_name, latents, mine_policy):
        penalty = mine_policy.value.weight.square().sum()
        return {"loss": 0.5 * penalty, "value_l2": penalty}


def value_l2(batch, latents, params):
    """:class:`ValueL2` as a pure objective of ``params``."""
    penalty = params["value.weight"].square().sum()
    return {"loss": 0.5 * penalty, "value_l2": penalty}


def assert_same_params(policy, state):
    for name, tensor in policy.state_dict().items():
        expected = state.params.get(name, state.buffers.get(name))
        assert torch.equal(tensor, expected), name


# ---- MineLightning against the functional API ----------------------------------------------------------

def test_bc_callback_trains_exactly_as_the_functional_api():
    data = batches(3)
    policy = tiny_policy()
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = MineLightning(policy, [BehaviorCloneCallback(0.01)], **HYPER)
    result = trainer.fit([minestudio_style(b) for b in data], max_steps=5, gradient_clip_val=1.0, compile=False)

    reference = tiny_policy()
    state, metrics = functional_run(reference, losses.weighted(losses.behavior_clone, 0.01), data, 5, clip=1.0)
    assert_same_params(policy, state)  # mine_policy holds the trained weights
    assert not torch.equal(policy.pi_buttons.weight, initial["pi_buttons.weight"])
    assert torch.equal(policy.value.weight, initial["value.weight"])  # BC reaches no value head: untouched
    for key in ("loss", "camera_loss", "button_loss", "entropy", "bc_weight", "lr", "grad_norm"):
        assert result[f"train/{key}"] == metrics[key].item(), key
    assert result["train/bc_weight"] == pytest.approx(0.01)
    assert trainer.state is not None and trainer.state.step.item() == 5


def test_user_bc_callback_from_the_docs_matches_the_builtin():
    data = [minestudio_style(b) for b in batches(2)]
    builtin, user = tiny_vpt(), tiny_vpt()
    expected = MineLightning(builtin, [BehaviorCloneCallback(0.01)], **HYPER).fit(data, max_steps=3, compile=False)
    got = MineLightning(user, [UserBC(0.01)], **HYPER).fit(data, max_steps=3, compile=False)
    for (name, a), b in zip(builtin.state_dict().items(), user.state_dict().values()):
        assert torch.equal(a, b), name
    assert got == pytest.approx(expected, rel=1e-6)


def test_callback_reading_a_weight_through_mine_policy_gets_its_gradient():
    data = batches(2)
    policy = tiny_policy()
    initial_value = policy.value.weight.detach().clone()
    trainer = MineLightning(policy, [BehaviorCloneCallback(0.01), ValueL2()], **HYPER)
    result = trainer.fit(data, max_steps=3, compile=False)

    objective = losses.combine(losses.weighted(losses.behavior_clone, 0.01), value_l2)
    state, _ = functional_run(tiny_policy(), objective, data, 3)
    assert_same_params(policy, state)
    assert not torch.equal(policy.value.weight, initial_value)  # only the penalty reaches it
    assert result["train/value_l2"] > 0


def test_callbacks_sum_as_minestudio_sums_them():
    policy = tiny_vpt()
    batch = {**random_batch(2, 4, 64), losses.STEP_KEY: torch.tensor(0)}
    latents, _ = policy(batch, policy.initial_state(2))
    params = dict(policy.named_parameters())

    class MetricsOnly(ObjectiveCallback):
        def __call__(self, batch, batch_idx, step_name, latents, mine_policy):
            return {"entropy": torch.tensor(1.0), "step_seen": batch_idx.float()}

    objective = callbacks_to_objective(
        [BehaviorCloneCallback(0.01), UserBC(0.02), MetricsOnly(), ObjectiveCallback()], policy
    )
    out = objective(batch, latents, params)
    one = losses.behavior_clone(batch, latents, params)
    torch.testing.assert_close(out["loss"], 0.03 * one["loss"])
    torch.testing.assert_close(out["entropy"], 2 * one["entropy"] + 1)
    assert out["bc_weight"].item() == pytest.approx(0.03)
    assert out["step_seen"].item() == 0
    with pytest.raises(ValueError, match="returned a 'loss'"):
        callbacks_to_objective([MetricsOnly()], policy)(batch, latents, params)
    with pytest.raises(ValueError, match="at least one"):
        callbacks_to_objective([], policy)


def test_kl_callback_is_kl_gaussian():
    q_mu, q_log_var, p_mu, p_log_var = torch.randn(4, 4, 8).unbind(0)  # (B=4, D=8) each
    latents = {"posterior_dist": {"mu": q_mu, "log_var": q_log_var}, "prior_dist": {"mu": p_mu, "log_var": p_log_var}}
    out = KLDivergenceCallback(0.5)({}, torch.tensor(0), "train", latents, None)
    kl = -0.5 * torch.sum(1 + (q_log_var - p_log_var) - (q_log_var - p_log_var).exp()
                          - (q_mu - p_mu).pow(2) / p_log_var.exp(), dim=-1)
    torch.testing.assert_close(out["loss"], 0.5 * kl.mean())
    torch.testing.assert_close(out["kl_div"], kl.mean())
    assert out["kl_weight"].item() == 0.5
    torch.testing.assert_close(KLDivergenceCallback().kl_divergence(q_mu, q_log_var, p_mu, p_log_var), kl)


# ---- fit: data, hooks, validation ----------------------------------------------------------------------

class Recorder(ObjectiveCallback):
    """Records ``before_step``'s calls and returns no loss."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def before_step(self, batch, batch_idx, step_name):
        self.calls.append((batch_idx, step_name, batch["episode"][0]))
        return batch


def test_fit_cycles_a_short_list_and_calls_before_step():
    data = [minestudio_style(b) for b in batches(2)]
    recorder = Recorder()
    trainer = MineLightning(tiny_policy(), [BehaviorCloneCallback(), recorder], log_freq=2, **HYPER)
    trainer.fit(data, max_steps=5, compile=False)
    assert [call[:2] for call in recorder.calls] == [(k, "train") for k in range(5)]
    assert [entry["step"] for entry in trainer.history] == [0, 2, 4]
    assert trainer.state.step.item() == 5


def test_fit_trains_from_a_loader_across_epochs(tmp_path):
    store = EpisodeStore.create(tmp_path / "store", image_size=(16, 16))
    fill_store(store, episodes=3, frames=12, seed=0)
    loader = make_loader(store, 4, EpisodeContinuous(2, seed=0))
    steps = 2 * len(loader) + 1  # the loader runs out twice
    trainer = MineLightning(TinyPolicy(hidsize=16, image_size=16), [BehaviorCloneCallback()], **HYPER)
    result = trainer.fit(loader, max_steps=steps, compile=False)
    assert trainer.state.step.item() == steps and np.isfinite(result["train/loss"])


def test_fit_rejects_an_iterator_that_runs_out():
    trainer = MineLightning(tiny_policy(), [BehaviorCloneCallback()], **HYPER)
    with pytest.raises(ValueError, match="iterated again"):
        trainer.fit(iter(batches(2)), max_steps=3, compile=False)


def test_validation_uses_trained_weights_and_its_own_memory():
    data = batches(2)
    policy = tiny_policy()
    trainer = MineLightning(policy, [BehaviorCloneCallback(0.01)], **HYPER)
    result = trainer.fit(data, max_steps=3, val_batches=[data[0]], val_every=2, compile=False)
    trained = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        latents, _ = policy(data[0], policy.initial_state(2))  # validation memory starts empty
        expected = losses.weighted(losses.behavior_clone, 0.01)(data[0], latents, {})
    assert result["val/loss"] == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert result["val/camera_loss"] == pytest.approx(expected["camera_loss"].item(), rel=1e-6)
    assert [entry["step"] for entry in trainer.history if "val/loss" in entry] == [2, 3]  # val_every=2, the end
    assert all(torch.equal(v, trained[k]) for k, v in policy.state_dict().items())  # validation updates nothing


# ---- pi_head and get_action -----------------------------------------------------------------------------

def random_pi_logits(B=3, T=5):
    return {"buttons": F.log_softmax(torch.randn(B, T, 1, 8641) * 3, -1),
            "camera": F.log_softmax(torch.randn(B, T, 1, 121) * 3, -1)}


def test_pi_head_keeps_its_state_dict_keys_and_matches_distributions():
    policy = tiny_vpt()
    assert type(policy.pi_head).__name__ == "DictActionHead"
    assert [k for k in policy.state_dict() if k.startswith("pi_head.")] == [
        "pi_head.buttons.linear_layer.weight", "pi_head.buttons.linear_layer.bias",
        "pi_head.camera.linear_layer.weight", "pi_head.camera.linear_layer.bias"]
    logits = random_pi_logits()
    action = {"buttons": torch.randint(0, 8641, (3, 5, 1)), "camera": torch.randint(0, 121, (3, 5, 1))}
    head = policy.pi_head
    per_head = head.logprob(action, logits, return_dict=True)
    expected = distributions.logprob(logits, action)
    for name in ("buttons", "camera"):
        assert per_head[name].shape == (3, 5)
        assert torch.equal(per_head[name], expected[name])
        assert torch.equal(head.entropy(logits, return_dict=True)[name], distributions.entropy(logits)[name])
    assert torch.equal(head.logprob(action, logits), expected["buttons"] + expected["camera"])
    entropy = distributions.entropy(logits)
    assert torch.equal(head.entropy(logits), entropy["buttons"] + entropy["camera"])
    other = random_pi_logits()
    kl = distributions.per_head_kl(logits, other)
    torch.testing.assert_close(head.kl_divergence(logits, other), (kl["buttons"] + kl["camera"])[..., None])
    mode = head.sample(logits, deterministic=True)
    assert all(torch.equal(mode[k], logits[k].argmax(-1)) for k in logits)
    sample = head.sample(logits)
    assert {k: v.shape for k, v in sample.items()} == {"buttons": (3, 5, 1), "camera": (3, 5, 1)}
    with pytest.raises(ValueError, match="lacks head"):
        head.logprob({"buttons": action["buttons"]}, logits)


def test_get_action_single_frame_and_batch():
    policy = tiny_vpt()
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    action, state = policy.get_action({"image": frame}, None, input_shape="*")
    assert {k: (v.shape, v.dtype) for k, v in action.items()} == {"buttons": ((1,), torch.int64),
                                                                  "camera": ((1,), torch.int64)}
    assert [t.shape for t in state] == [t.shape[1:] for t in policy.initial_state(1)]
    action, state = policy.get_action({"image": torch.from_numpy(frame)}, state, input_shape="*")  # carries on
    assert not any(t.requires_grad for t in state)

    image = random_batch(2, 3, 64)["image"]
    action, state = policy.get_action({"image": image}, None, deterministic=True)
    with torch.no_grad():
        latents, expected_state = policy({"image": image}, policy.initial_state(2))
    assert all(torch.equal(action[k], latents["pi_logits"][k].argmax(-1)) for k in action)
    assert action["buttons"].shape == (2, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(state, expected_state))
    with pytest.raises(ValueError, match="input_shape"):
        policy.get_action({"image": image}, None, input_shape="T*")


def test_get_action_round_trips_through_the_env_action_space():
    policy = tiny_vpt()
    chosen = env_to_agent({"forward": np.array(1), "jump": np.array(1), "attack": np.array(1),
                           "camera": np.array([-10.0, 4.0])})
    with torch.no_grad():  # heads that always pick `chosen`
        for name, head in policy.pi_head.items():
            head.linear_layer.weight.zero_()
            head.linear_layer.bias.zero_()
            head.linear_layer.bias[int(chosen[name][0])] = 10.0
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    action, _ = policy.get_action({"image": frame}, None, deterministic=True, input_shape="*")
    assert {k: int(v) for k, v in action.items()} == {k: int(v[0]) for k, v in chosen.items()}
    env = agent_to_env(action)
    assert env["forward"] == 1 and env["jump"] == 1 and env["attack"] == 1 and env["back"] == 0
    assert env["camera"].shape == (2,) and env["camera"][0] < 0 < env["camera"][1]  # degrees: pitch, yaw
    back = env_to_agent(env)
    assert all(torch.equal(back[k], action[k]) for k in action)


# ---- compiled: traceable callbacks compile, untraceable ones fall back ----------------------------------

class LoudValueL2(ValueL2):
    """:class:`ValueL2` that branches on a tensor's value in Python and prints it: dynamo cannot trace it."""

    def __call__(self, batch, batch_idx, step_name, latents, mine_policy):
        out = super().__call__(batch, batch_idx, step_name, latents, mine_policy)
        if out["value_l2"].item() > 0:
            print("value_l2", out["value_l2"])
        return out


@pytest.mark.slow
def test_compiled_fit_with_user_callbacks(capsys):
    data = batches(2)
    eager = tiny_policy()
    MineLightning(eager, [BehaviorCloneCallback(0.01), ValueL2()], **HYPER).fit(data, max_steps=3, compile=False)

    compiled = tiny_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a traceable callback compiles: no fallback warning
        MineLightning(compiled, [BehaviorCloneCallback(0.01), ValueL2()], **HYPER).fit(data, max_steps=3)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    loud = tiny_policy()
    with pytest.warns(UserWarning, match=r"callback LoudValueL2 at .*test_compat\.py:\d+") as caught:
        MineLightning(loud, [BehaviorCloneCallback(0.01), LoudValueL2()], **HYPER).fit(data, max_steps=3)
    assert len([w for w in caught if "could not be compiled" in str(w.message)]) == 1
    assert capsys.readouterr().out.count("value_l2") >= 3  # it ran eagerly, every step
    for (name, a), b in zip(eager.state_dict().items(), loud.state_dict().values()):
        assert torch.equal(a, b), name
