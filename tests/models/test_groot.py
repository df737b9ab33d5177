"""GrootPolicy: the policy protocol, shapes, memory carry, what the prior and posterior see, gradients into both
encoders under BC + KL, and training on synthetic data (eager; compiled: equal to eager, one graph)."""

import optree
import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models.groot import GrootConfig, GrootPolicy, with_latent_noise
from mstudio.policy import Policy, check_policy
from mstudio.train.state import check_memory

CONFIG = GrootConfig()  # tiny: 32x32 frames, hidsize 64, D = 16
B, T, SIZE, D = 3, 6, CONFIG.image_size, CONFIG.latent_dim
OBJECTIVE = losses.combine(losses.behavior_clone, losses.weighted(losses.kl_gaussian, 0.1))


def _policy(dtype=torch.float32):
    torch.manual_seed(0)
    return GrootPolicy(CONFIG).to(dtype)


def _frames(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, n, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen)


def _spec(tree):
    return optree.tree_map(lambda t: (tuple(t.shape), t.dtype), tree)


def test_follows_the_policy_protocol():
    policy = _policy()
    check_policy(policy)
    assert isinstance(policy, Policy)
    state = policy.initial_state(B)
    check_memory(state, B, "GrootPolicy.initial_state")


def test_latent_shapes_and_dtypes():
    policy = _policy()
    latents, state_out = policy({"image": _frames(T, 0)}, policy.initial_state(B))
    assert latents["pi_logits"]["buttons"].shape == (B, T, 1, 8641)
    assert latents["pi_logits"]["camera"].shape == (B, T, 1, 121)
    for logits in latents["pi_logits"].values():
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(B, T, 1))  # log-softmax
    assert latents["vpred"].shape == (B, T, 1)
    for dist in ("posterior_dist", "prior_dist"):
        assert _spec(latents[dist]) == {"mu": ((B, D), torch.float32), "log_var": ((B, D), torch.float32)}
    # Memory: VPT's (mask, K, V) per decoder layer, batch-first, fixed shapes; state_out has state_in's spec.
    assert _spec(state_out) == _spec(policy.initial_state(B)) == (
        ((B, 1, CONFIG.memory_len), torch.bool),
        ((B, CONFIG.memory_len, CONFIG.hidsize), torch.float32),
        ((B, CONFIG.memory_len, CONFIG.hidsize), torch.float32),
    ) * CONFIG.decoder_layers


def test_chunked_calls_with_carried_memory_equal_one_long_call():
    """With one ``z`` (a fixed reference video and noise), the memory carries the decoder across calls."""
    policy = _policy()
    images = _frames(2 * T, 1)
    common = {"reference_image": _frames(4, 2), "latent_noise": torch.randn(B, D)}
    whole, state_whole = policy({"image": images, **common}, policy.initial_state(B))
    first, state = policy({"image": images[:, :T], **common}, policy.initial_state(B))
    second, state = policy({"image": images[:, T:], **common}, state)
    for head in ("buttons", "camera"):
        torch.testing.assert_close(torch.cat([first["pi_logits"][head], second["pi_logits"][head]], 1),
                                   whole["pi_logits"][head], rtol=1e-5, atol=1e-5)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5), state, state_whole)
    # A fresh memory (what the step's reset gives) changes the second chunk.
    fresh, _ = policy({"image": images[:, T:], **common}, policy.initial_state(B))
    assert not torch.allclose(fresh["vpred"], second["vpred"])


def test_prior_depends_only_on_the_first_frame():
    policy = _policy()
    state = policy.initial_state(B)
    images = _frames(T, 3)
    later_changed = torch.cat([images[:, :1], _frames(T - 1, 4)], dim=1)
    first_changed = torch.cat([_frames(1, 5), images[:, 1:]], dim=1)
    base, _ = policy({"image": images}, state)
    same_start, _ = policy({"image": later_changed, "reference_image": _frames(5, 6)}, state)
    new_start, _ = policy({"image": first_changed}, state)
    for key in ("mu", "log_var"):
        torch.testing.assert_close(same_start["prior_dist"][key], base["prior_dist"][key], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(new_start["prior_dist"][key], base["prior_dist"][key])
        assert not torch.allclose(same_start["posterior_dist"][key], base["posterior_dist"][key])


def test_posterior_reads_the_reference_video_else_the_window():
    policy = _policy()
    state = policy.initial_state(B)
    images = _frames(T, 7)
    own, _ = policy({"image": images}, state)
    explicit, _ = policy({"image": images, "reference_image": images}, state)
    other, _ = policy({"image": images, "reference_image": _frames(T, 8)}, state)
    torch.testing.assert_close(explicit["posterior_dist"], own["posterior_dist"])
    assert not torch.allclose(other["posterior_dist"]["mu"], own["posterior_dist"]["mu"])
    torch.testing.assert_close(other["prior_dist"], own["prior_dist"])  # the prior never sees the reference
    assert not torch.allclose(other["vpred"], own["vpred"])  # the decoder is conditioned on z


def test_latent_noise_is_read_from_the_batch():
    """No key: ``z`` is the posterior mean (zero noise); noise changes the output; equal inputs, equal outputs."""
    policy = _policy()
    state = policy.initial_state(B)
    images = _frames(T, 9)
    mean, _ = policy({"image": images}, state)
    zero, _ = policy({"image": images, "latent_noise": torch.zeros(B, D)}, state)
    torch.testing.assert_close(zero["vpred"], mean["vpred"], rtol=0, atol=0)
    plain = {"image": images}
    noisy_batch = with_latent_noise(plain, D, generator=torch.Generator().manual_seed(0))
    assert noisy_batch["latent_noise"].shape == (B, D) and list(plain) == ["image"]  # input not modified
    noisy, _ = policy(noisy_batch, state)
    again, _ = policy(noisy_batch, state)
    assert not torch.allclose(noisy["vpred"], mean["vpred"])
    torch.testing.assert_close(again["vpred"], noisy["vpred"], rtol=0, atol=0)
    torch.testing.assert_close(noisy["posterior_dist"], mean["posterior_dist"], rtol=0, atol=0)


def test_gradients_reach_both_encoders_through_bc_plus_kl():
    policy = _policy()
    batch = with_latent_noise(random_batch(B, T, SIZE, seed=1), D, generator=torch.Generator().manual_seed(1))
    latents, _ = policy(batch, policy.initial_state(B))
    out = OBJECTIVE(batch, latents, {})
    assert set(out) >= {"loss", "kl_div", "camera_loss", "button_loss"}
    names, params = zip(*policy.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(out["loss"], params, allow_unused=True)))
    for prefix in ("video_encoder.", "prior_encoder.", "img_process.", "condition.", "recurrent_layer."):
        group = {n: g for n, g in grads.items() if n.startswith(prefix)}
        assert group and all(g is not None for g in group.values()), prefix
        assert sum(g.abs().sum() for g in group.values()) > 0, prefix
    # The prior learns from the KL term alone: without it, it gets no gradient.
    bc_only = losses.behavior_clone(batch, latents, {})["loss"]
    prior_grads = torch.autograd.grad(bc_only, list(policy.prior_encoder.parameters()), allow_unused=True)
    assert all(g is None for g in prior_grads)
    assert grads["value_head.weight"] is None  # neither BC nor KL reads vpred


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": torch.zeros(B, T, 16, 16, 3, dtype=torch.uint8)}, r"batch\['image'\] uint8 \(B, N, 32, 32, 3\)"),
        ({"reference_image": torch.zeros(B, 2, SIZE, SIZE, 3)},
         r"batch\['reference_image'\] uint8 \(3, N, 32, 32, 3\)"),
        ({"reference_image": torch.zeros(B + 1, 2, SIZE, SIZE, 3, dtype=torch.uint8)}, r"\(3, N, 32, 32, 3\).*\(4, 2"),
        ({"latent_noise": torch.zeros(B, D + 1)}, r"batch\['latent_noise'\] float \(3, 16\).*\(3, 17\)"),
        ({"latent_noise": torch.zeros(B, D, dtype=torch.long)}, r"latent_noise.*got torch.int64"),
    ],
)
def test_bad_batch(change, message):
    policy = _policy()
    with pytest.raises(ValueError, match=message):
        policy({"image": _frames(T, 0), **change}, policy.initial_state(B))


def test_bad_state_and_config():
    policy = _policy()
    with pytest.raises(ValueError, match=r"state_in\[1\] must be float \(3, 8, 64\), got torch.float32 \(2, 8, 64\)"):
        state = list(policy.initial_state(B))
        state[1] = torch.zeros(2, CONFIG.memory_len, CONFIG.hidsize)
        policy({"image": _frames(T, 0)}, state)
    with pytest.raises(ValueError, match="3 per decoder layer"):
        policy({"image": _frames(T, 0)}, policy.initial_state(B)[:2])
    with pytest.raises(ValueError, match="hidsize 60 is not divisible by heads 8"):
        GrootConfig(hidsize=60, heads=8)
    with pytest.raises(ValueError, match="hidsize must be even"):
        GrootConfig(hidsize=63, heads=3)
    with pytest.raises(ValueError, match="latent_dim must be a positive int, got 0"):
        GrootConfig(latent_dim=0)


def _train(step, state, n_steps, dtype=torch.float32):
    """``n_steps`` on one fixed synthetic batch (fresh seeded latent noise each step); the losses as floats."""
    batch = random_batch(4, 8, SIZE, seed=11)
    gen = torch.Generator().manual_seed(12)
    curve = []
    for _ in range(n_steps):
        state, metrics = step(state, with_latent_noise(batch, D, generator=gen, dtype=dtype))
        curve.append(metrics["loss"].item())
    return state, curve


def _optimizer():
    return mstudio.optim.adamw(lr=2e-3, weight_decay=0.0, warmup_steps=1)


def test_bc_plus_kl_training_lowers_the_loss():
    policy, optimizer = _policy(), _optimizer()
    step = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=False)
    state, curve = _train(step, mstudio.init_state(policy, optimizer, batch_size=4), 40)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(curve)))
    assert {n for n in state.params if not n.startswith("value_head.")} == step.reached


@pytest.mark.slow
def test_compiled_training_equals_eager_without_recompiles():
    """One graph (``make_train_step`` compiles with ``fullgraph=True``, so a break fails), no recompiles over the
    run, the first step's metrics equal eager's from the same state, and the loss falls. float32: after the
    first update Adam lifts float32 rounding differences to ~1e-4, so later steps are compared by the curve."""
    policy, optimizer = _policy(), _optimizer()
    torch._dynamo.reset()
    eager = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=False)
    compiled = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=True)
    state = mstudio.init_state(policy, optimizer, batch_size=4)
    batch = random_batch(4, 8, SIZE, seed=11)
    gen = torch.Generator().manual_seed(12)
    curve = []
    for i in range(30):
        noisy = with_latent_noise(batch, D, generator=gen)
        reference = eager(state, noisy)[1] if i == 0 else None
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            state, metrics = compiled(state, noisy)
        curve.append(metrics["loss"].item())
        if reference is not None:
            for key, value in reference.items():
                torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.7 * first, (first, last)
