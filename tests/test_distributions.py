"""Categorical heads and the Gaussian KL against direct float64 computations."""

import math

import pytest
import torch

from mstudio import distributions as D


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log_softmax(-1)


def test_logprob_entropy_kl_match_direct_sums():
    lp, lq = _logits(2, 3, 1, 5), _logits(2, 3, 1, 5, seed=1)
    action = torch.tensor([[[0], [4], [2]], [[1], [1], [3]]])
    logp = D.categorical_logprob(lp, action)
    assert logp.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            p = lp[b, t, 0].exp()
            assert logp[b, t].item() == pytest.approx(lp[b, t, 0, action[b, t, 0]].item())
            assert D.categorical_entropy(lp)[b, t].item() == pytest.approx(-(p * p.log()).sum().item())
            q = lq[b, t, 0].exp()
            assert D.categorical_kl(lp, lq)[b, t].item() == pytest.approx((p * (p / q).log()).sum().item())


def test_dict_versions_apply_to_every_head():
    pi = {"buttons": _logits(2, 3, 1, 8641), "camera": _logits(2, 3, 1, 121, seed=1)}
    actions = D.mode(pi)
    assert {k: v.shape for k, v in actions.items()} == {"buttons": (2, 3, 1), "camera": (2, 3, 1)}
    logp = D.logprob(pi, actions)
    assert all(torch.equal(logp[k], pi[k].max(-1).values.squeeze(-1)) for k in pi)
    assert set(D.entropy(pi)) == set(D.per_head_kl(pi, pi)) == {"buttons", "camera"}
    assert all(torch.allclose(v, torch.zeros_like(v)) for v in D.per_head_kl(pi, pi).values())


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    logits = probs.log().expand(20000, 1, 3)
    draws = D.categorical_sample(logits, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20000, 1)
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_diagonal_gaussian_kl_is_the_closed_form():
    q_mu, q_lv, p_mu, p_lv = (torch.randn(3, 4, dtype=torch.float64) for _ in range(4))
    kl = D.diagonal_gaussian_kl(q_mu, q_lv, p_mu, p_lv)
    for b in range(3):
        expected = sum(
            0.5 * (p_lv[b, d] - q_lv[b, d]).item()
            + (math.exp(q_lv[b, d].item()) + (q_mu[b, d] - p_mu[b, d]).item() ** 2) / (2 * math.exp(p_lv[b, d].item()))
            - 0.5
            for d in range(4)
        )
        assert kl[b].item() == pytest.approx(expected, rel=1e-12)


def test_shape_errors_say_what_was_expected():
    with pytest.raises(ValueError, match=r"needs actions of shape \(2, 3, 1\)"):
        D.categorical_logprob(_logits(2, 3, 1, 5), torch.zeros(2, 3, dtype=torch.long), head="camera")
    with pytest.raises(ValueError, match="integer"):
        D.categorical_logprob(_logits(2, 3, 1, 5), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="same heads"):
        D.per_head_kl({"a": _logits(1, 1, 3)}, {"b": _logits(1, 1, 3)})
