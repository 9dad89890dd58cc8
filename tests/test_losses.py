"""The DPO / NPO losses against hand computations, Salesforce's formula, and their invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

from npo.losses import diffusion_loss, dpo_loss, per_sample_mse, sft_loss, swap_halves, swap_pairs


def random_batch(pairs=6, seed=0, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(pairs, *shape, generator=g).repeat(2, 1, 1, 1)  # shared ε for w and l
    model_pred = noise + 0.5 * torch.randn(2 * pairs, *shape, generator=g)
    ref_pred = noise + 0.5 * torch.randn(2 * pairs, *shape, generator=g)
    return model_pred, ref_pred, noise


def test_loss_is_log2_when_model_equals_reference():
    _, ref_pred, target = random_batch()
    loss, m = dpo_loss(ref_pred.clone(), ref_pred, target, beta=2500.0)
    assert torch.allclose(loss, torch.tensor(math.log(2.0)))
    assert m["implicit_acc"] == 0.5 and m["reward_margin"] == 0  # every pair is a tie
    assert m["mse_w"] == m["ref_mse_w"] and m["mse_l"] == m["ref_mse_l"]


def test_hand_computation():
    # two pairs of 2-pixel "images" (N, C, H, W) = (4, 1, 1, 2); errors relative to the target e = [1, -1]
    e = torch.tensor([1.0, -1.0])
    target = e.expand(4, 1, 1, 2)
    err_model = torch.tensor([[1., 1.], [0., 2.],     # w of pair 0, w of pair 1
                              [2., 0.], [1., 1.]])    # l of pair 0, l of pair 1
    err_ref = torch.tensor([[1., 3.], [1., 1.],
                            [1., 1.], [0., 2.]])
    model_pred = (e + err_model).view(4, 1, 1, 2)
    ref_pred = (e + err_ref).view(4, 1, 1, 2)
    # mse_w = [1, 2], mse_l = [2, 1] -> d_θ = [-1, 1];  ref_mse_w = [5, 1], ref_mse_l = [1, 2] -> d_ref = [4, -1]
    # d_ref - d_θ = [5, -2]; with β = 0.5 the logits are [2.5, -1]
    beta = 0.5
    expected = (math.log1p(math.exp(-2.5)) + math.log1p(math.exp(1.0))) / 2
    loss, m = dpo_loss(model_pred, ref_pred, target, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["implicit_acc"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx((2.5 - 1.0) / 2)
    assert [m[k].item() for k in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l")] == [1.5, 1.5, 3.0, 1.5]


@pytest.mark.parametrize("beta_sf", [1.0, 5000.0])
def test_matches_salesforce_formula_at_twice_beta(beta_sf):
    model_pred, ref_pred, target = random_batch(seed=1)
    # Salesforce DiffusionDPO, written out independently: −log σ(−0.5·β_sf·(d_θ − d_ref))
    model_w, model_l = ((model_pred - target) ** 2).mean(dim=(1, 2, 3)).chunk(2)
    ref_w, ref_l = ((ref_pred - target) ** 2).mean(dim=(1, 2, 3)).chunk(2)
    inside = -0.5 * beta_sf * ((model_w - model_l) - (ref_w - ref_l))
    sf_loss = -F.logsigmoid(inside).mean()
    loss, m = dpo_loss(model_pred, ref_pred, target, beta=beta_sf / 2)
    assert torch.allclose(loss, sf_loss, rtol=1e-5)
    assert torch.allclose(m["implicit_acc"], (inside > 0).float().mean())  # no ties in random data


def test_one_sgd_step_moves_the_model_toward_the_preferred_images():
    # a tiny "denoiser": a 1x1 convolution W on the noisy input; the reference is W at its starting value
    g = torch.Generator().manual_seed(2)
    pairs, c = 8, 4
    noise = torch.randn(pairs, c, 4, 4, generator=g).repeat(2, 1, 1, 1)
    x_t = noise + torch.randn(2 * pairs, c, 4, 4, generator=g)  # w and l differ in their clean image only
    w0 = torch.eye(c) + 0.1 * torch.randn(c, c, generator=g)
    weight = torch.nn.Parameter(w0.clone())
    predict = lambda w: torch.einsum("oc,nchw->nohw", w, x_t)

    loss, before = dpo_loss(predict(weight), predict(w0), noise, beta=10.0)
    loss.backward()
    with torch.no_grad():
        weight -= 1e-3 * weight.grad
    new_loss, after = dpo_loss(predict(weight), predict(w0), noise, beta=10.0)

    # mse_w fell relative to mse_l: d_θ = mse_w − mse_l went down, the margin d_ref − d_θ went up from 0
    assert after["mse_w"] - after["mse_l"] < before["mse_w"] - before["mse_l"]
    assert after["reward_margin"] > 0 and after["implicit_acc"] > 0.5 and new_loss < loss


def test_swapping_pairs_flips_margin_and_accuracy():
    model_pred, ref_pred, target = random_batch(pairs=16, seed=3)
    loss, m = dpo_loss(model_pred, ref_pred, target, beta=100.0)
    assert 0 < m["implicit_acc"] < 1
    swapped_loss, s = dpo_loss(swap_halves(model_pred), swap_halves(ref_pred), swap_halves(target), beta=100.0)
    assert torch.allclose(s["reward_margin"], -m["reward_margin"])
    assert torch.allclose(s["implicit_acc"], 1 - m["implicit_acc"])
    # −log σ(−z) − (−log σ(z)) = z, so the two losses differ by exactly the mean margin
    assert torch.allclose(swapped_loss - loss, m["reward_margin"], rtol=1e-4)


def test_swap_helpers():
    w, l = torch.zeros(2, 3), torch.ones(2, 3)
    first, second = swap_pairs(w, l)
    assert first is l and second is w
    batch = torch.cat([w, l])
    assert torch.equal(swap_halves(batch), torch.cat([l, w]))
    assert torch.equal(swap_halves(swap_halves(batch)), batch)
    with pytest.raises(ValueError):
        swap_halves(torch.zeros(3, 2))


@pytest.mark.parametrize("beta", [1e6, 1e12])
def test_huge_beta_stays_finite(beta):
    model_pred, ref_pred, target = random_batch(seed=4)
    model_pred.requires_grad_(True)
    loss, m = dpo_loss(model_pred, ref_pred, target, beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model_pred.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    # in this limit −log σ(z) → max(−z, 0): the loss is β times the mean shortfall of the margin
    d_theta = per_sample_mse(model_pred, target).chunk(2)
    d_ref = per_sample_mse(ref_pred, target).chunk(2)
    margin = (d_ref[0] - d_ref[1]) - (d_theta[0] - d_theta[1])
    assert torch.allclose(loss, (beta * margin).clamp(max=0).neg().mean(), rtol=1e-4)
    assert torch.isinf(-torch.log(torch.sigmoid(beta * margin))).any()  # the naive formula would overflow


def test_low_precision_inputs_give_a_float32_loss():
    model_pred, ref_pred, target = (t.bfloat16() for t in random_batch(seed=5))
    loss, _ = dpo_loss(model_pred, ref_pred, target, beta=2500.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_sft_and_diffusion_losses():
    model_pred, _, target = random_batch(seed=6)
    assert torch.allclose(diffusion_loss(model_pred, target), ((model_pred - target) ** 2).mean())
    n = model_pred.shape[0] // 2
    assert torch.allclose(sft_loss(model_pred, target), ((model_pred[:n] - target[:n]) ** 2).mean())


def test_mismatched_batches_are_refused():
    model_pred, ref_pred, target = random_batch()
    with pytest.raises(ValueError):
        dpo_loss(model_pred[:-1], ref_pred[:-1], target[:-1], beta=1.0)
    with pytest.raises(ValueError):
        dpo_loss(model_pred, ref_pred[:2], target, beta=1.0)
