"""The objective zoo (entropy bonus, label-smoothed BC, L2-SP, value regression, reference KL) against formulas
written out independently in float64 (numpy, one step at a time), plus gradcheck, masks and error messages."""

import functools

import numpy as np
import pytest
import torch

from losses.behavior_clone import behavior_clone
from losses.combinators import combine, weighted
from losses.entropy import entropy_bonus
from losses.l2_init import l2_init
from losses.label_smoothing import label_smoothed_behavior_clone
from losses.reference_kl import reference_kl
from losses.value import value_regression

B, T = 3, 5
FULL = {"buttons": 8641, "camera": 121}
SMALL = {"buttons": 7, "camera": 61}  # 61 camera classes keep the null-camera index 60 valid


def _inputs(seed=0, classes=FULL, dtype=torch.float64):
    """Raw logits, reference raw logits, vpred, returns and a batch with padding and null-camera steps."""
    gen = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(B, T, 1, n, generator=gen, dtype=dtype) for k, n in classes.items()}
    ref = {k: v + 0.7 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in raw.items()}
    buttons = torch.randint(0, classes["buttons"], (B, T, 1), generator=gen)
    camera = torch.randint(0, 60, (B, T, 1), generator=gen)
    camera[0, :2] = 60  # steps where the camera did not move
    camera[2] = 60  # a whole row of them
    mask = torch.ones(B, T, dtype=torch.uint8)
    mask[1, 3:] = 0  # padding past an episode's end
    batch = {"agent_action": {"buttons": buttons, "camera": camera}, "mask": mask,
             "return": torch.randn(B, T, generator=gen, dtype=dtype) * 2}
    vpred = torch.randn(B, T, 1, generator=gen, dtype=dtype) * 2
    return raw, ref, vpred, batch


def _latents(raw, ref=None, vpred=None):
    latents = {"pi_logits": {k: torch.log_softmax(v, -1) for k, v in raw.items()}}
    if ref is not None:
        latents["reference_pi_logits"] = {k: torch.log_softmax(v, -1) for k, v in ref.items()}
    if vpred is not None:
        latents["vpred"] = vpred
    return latents


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _mask(batch):
    return batch["mask"].double().numpy() if "mask" in batch else np.ones((B, T))


def _escape(message):
    return message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")


# --- float64 references, one step at a time ---------------------------------------------------------------


def _entropy_reference(raw, batch):
    mask, total, count = _mask(batch), 0.0, 0.0
    for b in range(B):
        for t in range(T):
            step = 0.0
            for head in raw:
                lp = _log_softmax(raw[head][b, t, 0].numpy())
                step += -(np.exp(lp) * lp).sum()
            total += mask[b, t] * step
            count += mask[b, t]
    mean = total / max(count, 1.0)
    return {"loss": -mean, "mean_entropy": mean}


def _label_smoothing_reference(raw, batch, eps):
    mask, out = _mask(batch), {"camera_loss": 0.0, "button_loss": 0.0}
    for b in range(B):
        for t in range(T):
            for head, key in (("camera", "camera_loss"), ("buttons", "button_loss")):
                lp = _log_softmax(raw[head][b, t, 0].numpy())
                action = int(batch["agent_action"][head][b, t, 0])
                target = np.full(lp.shape, eps / lp.size)
                target[action] += 1 - eps
                counts = mask[b, t] * (float(action != 60) if head == "camera" else 1.0)
                out[key] += -(target * lp).sum() * counts / B
    out["loss"] = out["camera_loss"] + out["button_loss"]
    return out


def _value_reference(vpred, batch, delta=None):
    mask, total, count = _mask(batch), 0.0, 0.0
    for b in range(B):
        for t in range(T):
            err = float(vpred[b, t, 0]) - float(batch["return"][b, t])
            if delta is None:
                value = err**2
            elif abs(err) < delta:
                value = 0.5 * err**2
            else:
                value = delta * (abs(err) - 0.5 * delta)
            total += mask[b, t] * value
            count += mask[b, t]
    return total / max(count, 1.0)


def _kl_reference(raw, ref, batch, direction):
    mask, total = _mask(batch), 0.0
    for b in range(B):
        for t in range(T):
            for head in raw:
                lq = _log_softmax(raw[head][b, t, 0].numpy())  # the policy
                lr = _log_softmax(ref[head][b, t, 0].numpy())  # the reference
                kl = (np.exp(lr) * (lr - lq)).sum() if direction == "forward" else (np.exp(lq) * (lq - lr)).sum()
                moved = float(int(batch["agent_action"]["camera"][b, t, 0]) != 60) if head == "camera" else 1.0
                total += kl * mask[b, t] * moved
    return total / B


# --- entropy_bonus -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float32, None])
def test_entropy_bonus_matches_reference(mask_dtype):
    raw, _, _, batch = _inputs()
    if mask_dtype is None:
        del batch["mask"]
    else:
        batch["mask"] = batch["mask"].to(mask_dtype)
    out = entropy_bonus(batch, _latents(raw), {})
    ref = _entropy_reference(raw, batch)
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-12)
    assert out["mean_entropy"].item() == pytest.approx(ref["mean_entropy"], rel=1e-12)
    assert not out["mean_entropy"].requires_grad


def test_entropy_bonus_is_lowest_for_the_uniform_policy():
    raw, _, _, batch = _inputs()
    uniform = {k: torch.zeros_like(v) for k, v in raw.items()}
    out = entropy_bonus(batch, _latents(uniform), {})
    assert out["mean_entropy"].item() == pytest.approx(np.log(8641) + np.log(121), rel=1e-12)
    assert out["loss"] < entropy_bonus(batch, _latents(raw), {})["loss"]


# --- label_smoothed_behavior_clone -------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.95])
def test_label_smoothing_matches_reference(eps):
    raw, _, _, batch = _inputs()
    out = label_smoothed_behavior_clone(batch, _latents(raw), {}, smoothing=eps)
    ref = _label_smoothing_reference(raw, batch, eps)
    for key in ("loss", "camera_loss", "button_loss"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-12), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [True, False])
def test_label_smoothing_zero_is_behavior_clone_exactly(dtype, with_mask):
    raw, _, _, batch = _inputs(dtype=dtype)
    if not with_mask:
        del batch["mask"]
    latents = _latents(raw)
    ours = label_smoothed_behavior_clone(batch, latents, {}, smoothing=0)
    bc = behavior_clone(batch, latents, {})
    assert set(ours) == set(bc)
    for key in bc:
        assert torch.equal(ours[key], bc[key]), key
    # and under the same weight, through weighted (a partial hides the declared weight_key: pass it)
    bound = functools.partial(label_smoothed_behavior_clone, smoothing=0.0)
    w_ours = weighted(bound, 0.01, weight_key="bc_weight")(batch, latents, {})
    w_bc = weighted(behavior_clone, 0.01)(batch, latents, {})
    for key in w_bc:
        assert torch.equal(w_ours[key], w_bc[key]), key


def test_label_smoothing_default_is_0_1():
    raw, _, _, batch = _inputs()
    out = label_smoothed_behavior_clone(batch, _latents(raw), {})
    assert out["loss"].item() == pytest.approx(_label_smoothing_reference(raw, batch, 0.1)["loss"], rel=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_label_smoothing_rejects_bad_smoothing(bad):
    raw, _, _, batch = _inputs()
    with pytest.raises(ValueError, match=r"smoothing in \[0, 1\)"):
        label_smoothed_behavior_clone(batch, _latents(raw), {}, smoothing=bad)


# --- value_regression ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [None, 0.5, 3.0])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.float32, None])
def test_value_regression_matches_reference(delta, mask_dtype):
    _, _, vpred, batch = _inputs()
    if mask_dtype is None:
        del batch["mask"]
    else:
        batch["mask"] = batch["mask"].to(mask_dtype)
    out = value_regression(batch, {"vpred": vpred}, {}, huber_delta=delta)
    ref = _value_reference(vpred, batch, delta)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-12)
    assert out["value_loss"].item() == pytest.approx(ref, rel=1e-12)


def test_value_regression_all_padding_is_zero_not_nan():
    _, _, vpred, batch = _inputs()
    batch["mask"] = torch.zeros(B, T, dtype=torch.uint8)
    assert value_regression(batch, {"vpred": vpred}, {})["loss"].item() == 0.0


def test_value_regression_gives_no_gradient_to_the_return():
    _, _, vpred, batch = _inputs()
    batch["return"] = batch["return"].clone().requires_grad_()
    vpred = vpred.clone().requires_grad_()
    value_regression(batch, {"vpred": vpred}, {})["loss"].backward()
    assert batch["return"].grad is None and vpred.grad is not None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b, l: b.pop("return"), "value_regression needs batch['return'], float (B, T)"),
        (lambda b, l: b.__setitem__("return", torch.zeros(B, T, 1)), "batch['return'] float of shape (3, 5)"),
        (lambda b, l: b.__setitem__("return", torch.zeros(B, T, dtype=torch.long)), "got torch.int64 (3, 5)"),
        (lambda b, l: l.__setitem__("vpred", torch.zeros(B, T)), "latents['vpred'] of shape (B, T, 1), got (3, 5)"),
        (lambda b, l: l.pop("vpred"), "value_regression needs latents['vpred']"),
        (lambda b, l: b.__setitem__("mask", torch.ones(B)), "batch['mask'] must have shape (3, 5)"),
    ],
)
def test_value_regression_errors(edit, message):
    _, _, vpred, batch = _inputs()
    latents = {"vpred": vpred}
    edit(batch, latents)
    with pytest.raises(ValueError, match=_escape(message)):
        value_regression(batch, latents, {})


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_value_regression_rejects_bad_delta(bad):
    _, _, vpred, batch = _inputs()
    with pytest.raises(ValueError, match="huber_delta > 0"):
        value_regression(batch, {"vpred": vpred}, {}, huber_delta=bad)


# --- reference_kl --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float64, None])
def test_reference_kl_matches_reference(direction, mask_dtype):
    raw, ref, _, batch = _inputs()
    if mask_dtype is None:
        del batch["mask"]
    else:
        batch["mask"] = batch["mask"].to(mask_dtype)
    out = reference_kl(batch, _latents(raw, ref), {}, direction=direction)
    expected = _kl_reference(raw, ref, batch, direction)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["reference_kl"].item() == pytest.approx(expected, rel=1e-12)


def test_reference_kl_default_is_forward_and_directions_differ():
    raw, ref, _, batch = _inputs()
    latents = _latents(raw, ref)
    forward = reference_kl(batch, latents, {})["loss"]
    assert torch.equal(forward, reference_kl(batch, latents, {}, direction="forward")["loss"])
    assert forward.item() != pytest.approx(reference_kl(batch, latents, {}, direction="reverse")["loss"].item())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_reference_kl_is_zero_with_zero_gradient_at_the_reference(direction):
    raw, _, _, batch = _inputs(classes=SMALL)
    logits = {k: v.clone().requires_grad_() for k, v in raw.items()}
    latents = {"pi_logits": {k: torch.log_softmax(v, -1) for k, v in logits.items()},
               "reference_pi_logits": {k: torch.log_softmax(v, -1) for k, v in raw.items()}}
    loss = reference_kl(batch, latents, {}, direction=direction)["loss"]
    assert loss.item() == 0.0
    loss.backward()
    for head, leaf in logits.items():
        assert leaf.grad.abs().max().item() < 1e-15, head


def test_reference_kl_treats_the_reference_as_a_constant():
    raw, ref, _, batch = _inputs(classes=SMALL)
    reference = {k: torch.log_softmax(v.clone().requires_grad_(), -1) for k, v in ref.items()}
    policy = {k: torch.log_softmax(v.clone().requires_grad_(), -1) for k, v in raw.items()}
    loss = reference_kl(batch, {"pi_logits": policy, "reference_pi_logits": reference}, {})["loss"]
    reached = torch.autograd.grad(loss, list(reference.values()) + list(policy.values()), allow_unused=True)
    assert reached[0] is None and reached[1] is None  # the reference's heads
    assert reached[2] is not None and reached[3] is not None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b, l: l.pop("reference_pi_logits"), "latents['reference_pi_logits']"),
        (lambda b, l: l.pop("reference_pi_logits"), "mstudio.models.WithReference(policy)"),
        (lambda b, l: l.pop("pi_logits"), "reference_kl needs latents['pi_logits']"),
        (lambda b, l: b.pop("agent_action"), "reference_kl needs batch['agent_action']"),
        (lambda b, l: b["agent_action"].pop("camera"), "batch['agent_action']['camera']"),
        (lambda b, l: l["reference_pi_logits"].pop("camera"), "the same heads"),
        (lambda b, l: b.__setitem__("mask", torch.ones(B, T + 1)), "batch['mask'] must have shape (3, 5)"),
    ],
)
def test_reference_kl_errors(edit, message):
    raw, ref, _, batch = _inputs(classes=SMALL)
    latents = _latents(raw, ref)
    edit(batch, latents)
    with pytest.raises(ValueError, match=_escape(message)):
        reference_kl(batch, latents, {})


def test_reference_kl_rejects_unknown_direction():
    raw, ref, _, batch = _inputs(classes=SMALL)
    with pytest.raises(ValueError, match="direction 'forward'.*got 'backward'"):
        reference_kl(batch, _latents(raw, ref), {}, direction="backward")


# --- l2_init -------------------------------------------------------------------------------------------------


def _params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(4, 3, generator=gen, dtype=dtype),
            "encoder.bias": torch.randn(4, generator=gen, dtype=dtype),
            "head.weight": torch.randn(2, 4, generator=gen, dtype=dtype)}


def _l2_reference(params, initial, names):
    return sum(float(((params[n].numpy() - initial[n].numpy()) ** 2).sum()) for n in names)


@pytest.mark.parametrize("names", [None, ["head.weight"], ("encoder.bias", "head.weight")])
def test_l2_init_matches_reference(names):
    initial = _params(seed=0)
    objective = l2_init(initial, names=names)
    params = _params(seed=1)
    out = objective({}, {}, params)
    expected = _l2_reference(params, initial, names or list(initial))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["l2_init"].item() == pytest.approx(expected, rel=1e-12)
    assert objective({}, {}, initial)["loss"].item() == 0.0


def test_l2_init_copies_its_anchors_and_mutates_nothing():
    initial = _params(seed=0)
    before = {k: v.clone() for k, v in initial.items()}
    objective = l2_init(initial)
    assert all(torch.equal(initial[k], before[k]) for k in initial)  # not modified when built
    for tensor in initial.values():
        tensor.add_(1.0)  # training the source afterwards does not move the anchors
    params = _params(seed=1)
    params_before = {k: v.clone() for k, v in params.items()}
    out = objective({}, {}, params)
    assert out["loss"].item() == pytest.approx(_l2_reference(params, before, list(before)), rel=1e-12)
    assert all(torch.equal(params[k], params_before[k]) for k in params)


def test_l2_init_skips_non_float_tensors_and_takes_grad_requiring_sources():
    module = torch.nn.Linear(3, 2).double()
    initial = {**dict(module.named_parameters()), "steps": torch.zeros((), dtype=torch.long)}
    objective = l2_init(initial)
    assert objective.names == ("weight", "bias")
    params = {k: v.detach() + 0.5 for k, v in module.named_parameters()}
    assert objective({}, {}, params)["loss"].item() == pytest.approx(0.25 * (6 + 2), rel=1e-12)


def test_l2_init_errors():
    initial = _params()
    with pytest.raises(ValueError, match=r"names \['nope'\] are not in initial_params"):
        l2_init(initial, names=["head.weight", "nope"])
    with pytest.raises(TypeError, match="list of parameter names, got the string 'head.weight'"):
        l2_init(initial, names="head.weight")
    with pytest.raises(ValueError, match=r"\['steps'\] are not float tensors"):
        l2_init({"steps": torch.zeros(2, dtype=torch.long)}, names=["steps"])
    with pytest.raises(ValueError, match="nothing to anchor"):
        l2_init({"steps": torch.zeros(2, dtype=torch.long)})
    objective = l2_init(initial)
    params = _params()
    del params["head.weight"]
    with pytest.raises(ValueError, match=r"anchors \['head.weight'\] that params lacks"):
        objective({}, {}, params)
    params = {**_params(), "encoder.bias": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"differ in shape: encoder.bias: anchor \(4,\), param \(5,\)"):
        objective({}, {}, params)


# --- masks: padding steps do not count -----------------------------------------------------------------------


def _poison_padding(raw, ref, vpred, batch):
    """Huge values at the padded steps (row 1, t >= 3)."""
    for tree in (raw, ref):
        for v in tree.values():
            v[1, 3:] = 1e3 * torch.randn(v[1, 3:].shape, dtype=v.dtype)
    vpred[1, 3:] = 1e6
    batch["return"][1, 3:] = -1e6


OBJECTIVES = {
    "entropy_bonus": entropy_bonus,
    "label_smoothed_behavior_clone": label_smoothed_behavior_clone,
    "value_regression": value_regression,
    "value_regression_huber": functools.partial(value_regression, huber_delta=1.0),
    "reference_kl": reference_kl,
    "reference_kl_reverse": functools.partial(reference_kl, direction="reverse"),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_padding_steps_do_not_count(name):
    objective = OBJECTIVES[name]
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    clean = objective(batch, _latents(raw, ref, vpred), {})["loss"]
    _poison_padding(raw, ref, vpred, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in raw.items()}
    vpred = vpred.clone().requires_grad_()
    latents = _latents(leaves, ref, vpred)
    poisoned = objective(batch, latents, {})["loss"]
    assert poisoned.item() == pytest.approx(clean.item(), rel=1e-12)
    grads = torch.autograd.grad(poisoned, [*leaves.values(), vpred], allow_unused=True)
    for grad in grads:
        if grad is not None:
            assert grad[1, 3:].abs().sum() == 0
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["label_smoothed_behavior_clone", "reference_kl", "reference_kl_reverse"])
def test_camera_head_not_trained_where_the_camera_did_not_move(name):
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    leaves = {k: v.clone().requires_grad_() for k, v in raw.items()}
    OBJECTIVES[name](batch, _latents(leaves, ref, vpred), {})["loss"].backward()
    assert leaves["camera"].grad[2].abs().sum() == 0  # camera == 60 everywhere in row 2
    assert leaves["camera"].grad[0, :2].abs().sum() == 0
    assert leaves["buttons"].grad[2].abs().sum() > 0  # ... but its buttons still count


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_mask_of_wrong_shape_is_refused(name):
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    batch["mask"] = torch.ones(B, T + 1)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must have shape \(3, 5\)"):
        OBJECTIVES[name](batch, _latents(raw, ref, vpred), {})


@pytest.mark.parametrize("name", ["entropy_bonus", "label_smoothed_behavior_clone", "reference_kl"])
def test_missing_pi_logits_names_the_key(name):
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    latents = _latents(raw, ref, vpred)
    del latents["pi_logits"]
    with pytest.raises(ValueError, match=rf"{name} needs latents\['pi_logits'\]"):
        OBJECTIVES[name](batch, latents, {})


# --- gradcheck (float64, few classes) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck(name):
    objective = OBJECTIVES[name]
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    batch["mask"] = batch["mask"].double() * 0.75  # a fractional mask weights steps
    reference = _latents(ref)["pi_logits"]

    def loss(buttons, camera, vpred):
        latents = {"pi_logits": {"buttons": torch.log_softmax(buttons, -1), "camera": torch.log_softmax(camera, -1)},
                   "reference_pi_logits": reference, "vpred": vpred}
        return objective(batch, latents, {})["loss"]

    inputs = (raw["buttons"].clone().requires_grad_(), raw["camera"].clone().requires_grad_(),
              vpred.clone().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)  # a random projection of the Jacobian


def test_gradcheck_l2_init():
    initial = _params()
    objective = l2_init(initial, names=["encoder.weight", "head.weight"])
    names = list(initial)

    def loss(*tensors):
        return objective({}, {}, dict(zip(names, tensors)))["loss"]

    assert torch.autograd.gradcheck(loss, tuple(t.clone().requires_grad_() for t in _params(seed=1).values()))


# --- composition and torch.func --------------------------------------------------------------------------------


def test_objectives_combine_and_weight():
    raw, ref, vpred, batch = _inputs()
    latents = _latents(raw, ref, vpred)
    params = _params(seed=1)
    l2 = l2_init(_params(seed=0))
    objective = combine(
        weighted(label_smoothed_behavior_clone, 0.01),
        weighted(entropy_bonus, 0.1),
        weighted(reference_kl, 0.5),
        weighted(value_regression, 2.0),
        weighted(l2, 1e-3),
    )
    out = objective(batch, latents, params)
    expected = (0.01 * _label_smoothing_reference(raw, batch, 0.1)["loss"]
                + 0.1 * _entropy_reference(raw, batch)["loss"]
                + 0.5 * _kl_reference(raw, ref, batch, "forward") + 2.0 * _value_reference(vpred, batch)
                + 1e-3 * _l2_reference(params, _params(seed=0), list(params)))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["bc_weight"].item() == pytest.approx(0.01)
    assert {"mean_entropy", "reference_kl", "value_loss", "l2_init", "entropy"} <= set(out)
    # the entropy bonus's metric does not collide with behaviour cloning's
    both = combine(behavior_clone, weighted(entropy_bonus, 0.1))(batch, latents, params)
    assert torch.equal(both["entropy"], behavior_clone(batch, latents, params)["entropy"])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_run_under_torch_func_grad(name):
    """The compiled step differentiates with torch.func: no .item(), no data-dependent Python branches."""
    objective = OBJECTIVES[name]
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    latents = _latents(raw, ref)

    def loss(logits, vpred):
        return objective(batch, {**latents, "pi_logits": logits, "vpred": vpred}, {})["loss"]

    grads = torch.func.grad(loss, argnums=(0, 1))(latents["pi_logits"], vpred)
    expected = torch.autograd.grad(
        loss(*(leaves := ({k: v.clone().requires_grad_() for k, v in latents["pi_logits"].items()},
                          vpred.clone().requires_grad_()))),
        [*leaves[0].values(), leaves[1]], allow_unused=True)
    got = [*grads[0].values(), grads[1]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-12, atol=1e-14)


def _row(tree, i):
    return {k: _row(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_vmap_over_the_batch(name):
    """Per-sample use (torch.func.vmap over B) equals calling the objective on each row alone."""
    objective = OBJECTIVES[name]
    raw, ref, vpred, batch = _inputs(classes=SMALL)
    latents = _latents(raw, ref, vpred)
    per_row = torch.func.vmap(lambda b, l: objective(b, l, {})["loss"])(batch, latents)
    loop = torch.stack([objective(_row(batch, i), _row(latents, i), {})["loss"] for i in range(B)])
    torch.testing.assert_close(per_row, loop, rtol=1e-12, atol=1e-14)


def test_l2_init_mixes_dtypes():
    initial = {"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.float64)}
    out = l2_init(initial)({}, {}, {"a": torch.ones(2), "b": torch.full((3,), 2.0, dtype=torch.float64)})
    assert out["loss"].dtype == torch.float64 and out["loss"].item() == 2 + 12
