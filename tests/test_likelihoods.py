"""Tests for elbox.models.likelihoods: each observation model against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from elbox.core.errors import ElboxError
from elbox.models.likelihoods import (
    LIKELIHOODS,
    AutoregressiveBernoulliLikelihood,
    BernoulliLikelihood,
    CategoricalLikelihood,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    LearnedGaussianLikelihood,
    build_likelihood,
)

F64 = torch.float64
SHAPE = (2, 3, 4)  # (C, H, W)
D = 2 * 3 * 4
LEVELS = torch.arange(256, dtype=F64) / 255  # every 8-bit value k / 255


def eight_bit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).to(F64) / 255


# ----------------------------------------------------------------------------------------------
# Bernoulli


def test_bernoulli_is_minus_bce_with_logits():
    torch.manual_seed(0)
    lik = BernoulliLikelihood(SHAPE)
    assert lik.num_params == 1
    logits = torch.randn(5, 1, *SHAPE, dtype=F64) * 4
    x = torch.bernoulli(torch.full((5, *SHAPE), 0.5, dtype=F64))
    expected = -F.binary_cross_entropy_with_logits(logits[:, 0], x, reduction="none").sum((1, 2, 3))
    got = lik.log_prob(logits, x)
    assert got.shape == (5,)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bernoulli_broadcasts_samples_against_batch():
    torch.manual_seed(1)
    lik = BernoulliLikelihood(SHAPE)
    k, b = 3, 4
    logits = torch.randn(k, b, 1, *SHAPE, dtype=F64) * 3
    x = torch.bernoulli(torch.full((b, *SHAPE), 0.3, dtype=F64))
    got = lik.log_prob(logits, x)
    assert got.shape == (k, b)
    for i in range(k):
        expected = -F.binary_cross_entropy_with_logits(logits[i, :, 0], x, reduction="none").sum((1, 2, 3))
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)
    # mean is sigmoid(logits), in [0, 1]
    torch.testing.assert_close(lik.mean(logits), torch.sigmoid(logits[:, :, 0]))


# ----------------------------------------------------------------------------------------------
# Autoregressive Bernoulli


def random_ar(data_shape, ar_channels=4, ar_kernel=3, seed=0):
    """A bernoulli-ar likelihood in float64 with every weight random (the trained-model case; at init g is zero)."""
    torch.manual_seed(seed)
    lik = AutoregressiveBernoulliLikelihood(data_shape, ar_channels=ar_channels, ar_kernel=ar_kernel).double()
    for p in lik.parameters():
        torch.nn.init.normal_(p, std=1.5)
    return lik


def every_binary_image(data_shape):
    d = math.prod(data_shape)
    bits = (torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1
    return bits.to(F64).reshape(-1, *data_shape)


def test_bernoulli_ar_starts_as_bernoulli():
    lik = AutoregressiveBernoulliLikelihood(SHAPE)
    x = torch.bernoulli(torch.full((3, *SHAPE), 0.5))
    params = torch.randn(3, 1, *SHAPE)
    torch.testing.assert_close(lik.log_prob(params, x), BernoulliLikelihood(SHAPE).log_prob(params, x))


@pytest.mark.parametrize("data_shape, kernel", [((1, 3, 4), 3), ((2, 2, 3), 3), ((1, 3, 3), 5)])
def test_bernoulli_ar_is_normalized(data_shape, kernel):
    """exp(log p(x|z)) sums to 1 over every binary image, with random weights: the mask lets no pixel see itself or
    a later pixel (a leak would make the sum differ from 1)."""
    lik = random_ar(data_shape, ar_kernel=kernel)
    xs = every_binary_image(data_shape)
    params = torch.randn(1, 1, *data_shape, dtype=F64)
    total = lik.log_prob(params.expand(len(xs), *params.shape[1:]), xs).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)


def test_bernoulli_ar_logit_depends_only_on_earlier_pixels_in_the_window():
    data_shape, kernel = (1, 6, 7), 5
    lik = random_ar(data_shape, ar_kernel=kernel, seed=1)
    x = torch.bernoulli(torch.full((1, *data_shape), 0.5, dtype=F64))
    base = lik.context_logits(x)
    _, h, w = data_shape
    for j in range(h * w):
        flipped = x.clone()
        flipped.view(-1)[j] = 1 - flipped.view(-1)[j]
        changed = (lik.context_logits(flipped) != base).view(-1).nonzero().squeeze(1).tolist()
        rj, cj = divmod(j, w)
        for i in changed:
            ri, ci = divmod(i, w)
            assert i > j, f"pixel {i} depends on the later pixel {j}"
            assert ri - rj <= kernel // 2 and abs(ci - cj) <= kernel // 2, f"pixel {i} sees {j} outside its window"


def test_bernoulli_ar_scores_importance_samples_like_single_ones():
    """params [K, B, ...] against x [B, ...] gives what each sample gives alone, and the gradient reaches g."""
    lik = random_ar(SHAPE, seed=2)
    x = torch.bernoulli(torch.full((3, *SHAPE), 0.5, dtype=F64))
    params = torch.randn(5, 3, 1, *SHAPE, dtype=F64)
    batched = lik.log_prob(params, x)
    assert batched.shape == (5, 3)
    for k in range(5):
        torch.testing.assert_close(batched[k], lik.log_prob(params[k], x))
    batched.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lik.parameters())


def test_bernoulli_ar_draws_follow_log_prob():
    """Frequencies of sample() over all 64 images of 2 x 3 pixels match exp(log_prob): a chi-square statistic within
    5 standard deviations of its mean (63 degrees of freedom)."""
    data_shape = (1, 2, 3)
    lik = random_ar(data_shape, seed=3)
    params = torch.randn(1, 1, *data_shape, dtype=F64)
    torch.manual_seed(4)
    n = 100_000
    draws = lik.sample(params.expand(n, *params.shape[1:]))
    assert draws.shape == (n, *data_shape)
    codes = (draws.reshape(n, -1).long() << torch.arange(5, -1, -1)).sum(1)
    observed = torch.bincount(codes, minlength=64).to(F64)
    expected = n * lik.log_prob(params.expand(64, *params.shape[1:]), every_binary_image(data_shape)).exp()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 63 + 5 * math.sqrt(2 * 63), chi2


def test_bernoulli_ar_mean_feeds_probabilities_forward():
    """mean() is the sequential mean-field pass: pixel i's value is sigmoid(l_i + g(m)_i) with m the values before
    it, so the result is a fixed point of that map."""
    lik = random_ar((1, 4, 4), seed=5)
    params = torch.randn(2, 1, 1, 4, 4, dtype=F64)
    m = lik.mean(params)
    torch.testing.assert_close(m, torch.sigmoid(params.squeeze(1) + lik.context_logits(m)))
    assert not torch.allclose(m, torch.sigmoid(params.squeeze(1)))


def test_bernoulli_ar_refuses_bad_shapes_and_options():
    with pytest.raises(ElboxError, match=r"images \[C, H, W\]"):
        AutoregressiveBernoulliLikelihood((12,))
    for kernel in (1, 4):
        with pytest.raises(ElboxError, match="ar_kernel"):
            AutoregressiveBernoulliLikelihood(SHAPE, ar_kernel=kernel)
    with pytest.raises(ElboxError, match="ar_channels"):
        AutoregressiveBernoulliLikelihood(SHAPE, ar_channels=0)
    # a config's options reach the likelihood
    lik = build_likelihood("bernoulli-ar", SHAPE, ar_channels=5, ar_kernel=5)
    assert lik.hidden.out_features == 5 and lik.kernel == 5


# ----------------------------------------------------------------------------------------------
# Gaussian, fixed sigma


@pytest.mark.parametrize("sigma", [0.05, 0.1, 1.0, 3.0])
def test_fixed_gaussian_log_prob(sigma):
    torch.manual_seed(2)
    lik = GaussianLikelihood(SHAPE, sigma=sigma)
    mu = torch.rand(3, 4, 1, *SHAPE, dtype=F64)
    x = torch.rand(4, *SHAPE, dtype=F64)
    got = lik.log_prob(mu, x)
    assert got.shape == (3, 4)
    constant = -D * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    assert lik.constant() == pytest.approx(constant, rel=1e-14)
    squared_error = (x - mu[:, :, 0]).square().sum((-3, -2, -1))
    torch.testing.assert_close(got, -squared_error / (2 * sigma**2) + constant, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got, Normal(mu[:, :, 0], sigma).log_prob(x).sum((-3, -2, -1)), rtol=1e-12, atol=1e-10)


def test_fixed_gaussian_is_scaled_squared_error():
    """log p(x|mu1) - log p(x|mu2) = -(||x - mu1||^2 - ||x - mu2||^2) / (2 sigma^2): maximizing it minimizes SE."""
    torch.manual_seed(3)
    sigma = 0.3
    lik = GaussianLikelihood(SHAPE, sigma=sigma)
    x = torch.rand(6, *SHAPE, dtype=F64)
    mu1, mu2 = torch.rand(2, 6, 1, *SHAPE, dtype=F64)
    se1 = (x - mu1[:, 0]).square().sum((1, 2, 3))
    se2 = (x - mu2[:, 0]).square().sum((1, 2, 3))
    diff = lik.log_prob(mu1, x) - lik.log_prob(mu2, x)
    torch.testing.assert_close(diff, -(se1 - se2) / (2 * sigma**2), rtol=1e-10, atol=1e-10)
    # the better fit (smaller squared error) has the larger log-likelihood
    assert torch.equal(diff > 0, se1 < se2)
    # the maximum over mu is at mu = x
    assert (lik.log_prob(x.unsqueeze(1), x) > lik.log_prob(mu1, x)).all()


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_fixed_gaussian_rejects_bad_sigma(sigma):
    with pytest.raises(ElboxError, match="sigma"):
        GaussianLikelihood(SHAPE, sigma=sigma)


# ----------------------------------------------------------------------------------------------
# Gaussian, learned sigma


def test_learned_gaussian_matches_normal_and_init():
    torch.manual_seed(4)
    lik = LearnedGaussianLikelihood(SHAPE, sigma_init=0.2, sigma_floor=0.01).double()
    torch.testing.assert_close(lik.sigma, torch.full(SHAPE, 0.2, dtype=F64), rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        lik.raw_sigma.copy_(torch.randn(SHAPE, dtype=F64))
    mu = torch.rand(3, 2, 1, *SHAPE, dtype=F64)
    x = torch.rand(2, *SHAPE, dtype=F64)
    sigma = 0.01 + F.softplus(lik.raw_sigma.detach())
    expected = Normal(mu[:, :, 0], sigma).log_prob(x).sum((-3, -2, -1))
    got = lik.log_prob(mu, x)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_learned_gaussian_sigma_floor_and_gradient():
    floor = 1e-3
    lik = LearnedGaussianLikelihood(SHAPE, sigma_init=0.1, sigma_floor=floor).double()
    with torch.no_grad():
        lik.raw_sigma.fill_(-200.0)
    assert (lik.sigma >= floor).all()
    with torch.no_grad():
        lik.raw_sigma.copy_(torch.linspace(-50, 50, D, dtype=F64).view(SHAPE))
    assert (lik.sigma >= floor).all()
    lik.raw_sigma.data.zero_()
    mu = torch.rand(2, 1, *SHAPE, dtype=F64)
    x = torch.rand(2, *SHAPE, dtype=F64)
    lik.log_prob(mu, x).sum().backward()
    grad = lik.raw_sigma.grad
    assert grad is not None and grad.shape == SHAPE
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_learned_gaussian_rejects_floor_above_init():
    with pytest.raises(ElboxError):
        LearnedGaussianLikelihood(SHAPE, sigma_init=0.1, sigma_floor=0.2)


# ----------------------------------------------------------------------------------------------
# Discretized logistic


def reference_discretized_logistic(logit_pi, mu, log_s, k):
    """Direct float64 probability sum_m pi_m [sigmoid(a) - sigmoid(b)], edges at -inf / +inf.

    logit_pi, mu, log_s: [N, M]; k: [L] integer levels. Returns P [L, N].
    The difference of sigmoids is taken on the side where it does not cancel: if both arguments
    are positive, sigmoid(a) - sigmoid(b) = sigmoid(-b) - sigmoid(-a).
    """
    k = k.to(F64)[:, None, None]
    s = log_s.clamp(min=-7.0).exp()
    centre = 2 * k / 255 - 1
    upper = torch.where(k == 255, torch.tensor(math.inf, dtype=F64), centre + 1 / 255)
    lower = torch.where(k == 0, torch.tensor(-math.inf, dtype=F64), centre - 1 / 255)
    a = (upper - mu) / s
    b = (lower - mu) / s
    both_positive = b > 0
    p = torch.where(both_positive, torch.sigmoid(-b) - torch.sigmoid(-a), torch.sigmoid(a) - torch.sigmoid(b))
    weights = torch.softmax(logit_pi, -1)
    return (weights * p).sum(-1)


def dl_params(n_mixtures, seed):
    """[N, M] parameter sets covering extreme means (beyond [-1, 1], at the edges) and scales (at and below the
    clamp)."""
    g = torch.Generator().manual_seed(seed)
    means = [-3.0, -1.0, -0.999, -0.5, 0.0, 1 / 255, 0.3, 0.99, 1.0, 2.5]
    log_scales = [-12.0, -7.0, -5.0, -2.0, 0.0, 1.5, 4.0]
    rows_mu, rows_s = [], []
    for m in means:
        for s in log_scales:
            rows_mu.append(m)
            rows_s.append(s)
    n = len(rows_mu)
    mu = torch.tensor(rows_mu, dtype=F64)[:, None].repeat(1, n_mixtures)
    log_s = torch.tensor(rows_s, dtype=F64)[:, None].repeat(1, n_mixtures)
    if n_mixtures > 1:  # spread the other components randomly
        mu[:, 1:] = torch.rand(n, n_mixtures - 1, generator=g, dtype=F64) * 2.4 - 1.2
        log_s[:, 1:] = torch.rand(n, n_mixtures - 1, generator=g, dtype=F64) * 8 - 7
    logit_pi = torch.randn(n, n_mixtures, generator=g, dtype=F64) * 2
    return logit_pi, mu, log_s


def dl_pack(logit_pi, mu, log_s):
    """[N, M] each -> params [1, N, 3M, 1] for data_shape (1,)."""
    return torch.cat([logit_pi, mu, log_s], -1)[None, :, :, None]


def dl_all_levels_log_prob(lik, params):
    """log P(k) for every level k, [256, N]: x [256, 1, 1] broadcasts against params' leading dims [1, N]."""
    x = LEVELS.to(params.dtype)[:, None, None]
    return lik.log_prob(params, x)


@pytest.mark.parametrize(
    "n_mixtures, dtype",
    [
        (1, torch.float32),
        (1, F64),
        (3, torch.float32),
        (3, F64),
    ],
)
def test_discretized_logistic_sums_to_one(n_mixtures, dtype):
    lik = DiscretizedLogisticLikelihood((1,), n_mixtures=n_mixtures)
    assert lik.num_params == 3 * n_mixtures
    params = dl_pack(*dl_params(n_mixtures, seed=n_mixtures)).to(dtype)
    log_p = dl_all_levels_log_prob(lik, params)
    assert log_p.shape == (256, params.shape[1])
    assert torch.isfinite(log_p).all()
    assert (log_p <= 1e-6).all()
    total = log_p.double().exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_mixtures", [1, 3])
def test_discretized_logistic_matches_direct_computation(n_mixtures):
    lik = DiscretizedLogisticLikelihood((1,), n_mixtures=n_mixtures)
    logit_pi, mu, log_s = dl_params(n_mixtures, seed=10 + n_mixtures)
    log_p = dl_all_levels_log_prob(lik, dl_pack(logit_pi, mu, log_s))  # [256, N]
    ref = reference_discretized_logistic(logit_pi, mu, log_s, torch.arange(256))  # [256, N]
    torch.testing.assert_close(log_p.exp(), ref, rtol=1e-8, atol=1e-13)
    # in log space wherever the direct probability is not vanishingly small
    ok = ref > 1e-200
    assert ok.sum() > 1000
    torch.testing.assert_close(log_p[ok], ref[ok].log(), rtol=1e-8, atol=1e-8)


def test_discretized_logistic_edge_levels():
    """Level 0 owns all mass below its upper edge, level 255 all mass above its lower edge (not just one bin).

    The tolerance (rel 1e-6) checks which bins are edges; float64 precision is checked by
    test_discretized_logistic_matches_direct_computation.
    """
    lik = DiscretizedLogisticLikelihood((1,))
    h = 1 / 255
    for mu, log_s in [(-2.0, -1.0), (-1.0, -3.0), (1.0, -3.0), (2.0, -1.0), (0.0, 0.0)]:
        params = torch.tensor([0.0, mu, log_s], dtype=F64)[None, :, None]
        s = math.exp(log_s)
        p0 = lik.log_prob(params, torch.zeros(1, 1, dtype=F64)).exp().item()
        p255 = lik.log_prob(params, torch.ones(1, 1, dtype=F64)).exp().item()
        sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
        assert p0 == pytest.approx(sigmoid((-1 + h - mu) / s), rel=1e-6, abs=1e-15)
        assert p255 == pytest.approx(1 - sigmoid((1 - h - mu) / s), rel=1e-6, abs=1e-15)
        # level 254 sits at 0.99216 > 0.99: it must be an interior bin (the NVAE threshold bug)
        p254 = lik.log_prob(params, torch.full((1, 1), 254 / 255, dtype=F64)).exp().item()
        c254 = 2 * 254 / 255 - 1
        assert p254 == pytest.approx(sigmoid((c254 + h - mu) / s) - sigmoid((c254 - h - mu) / s), rel=1e-6, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_discretized_logistic_finite_at_clamp_and_large_scales(dtype):
    lik = DiscretizedLogisticLikelihood((1,), n_mixtures=2)
    rows = []
    for log_s in [-30.0, -7.0, -6.9, 5.0, 10.0, 20.0]:
        for mu in [-1.0, -1 + 1 / 255, 0.0, 1.0, 50.0, -50.0]:
            rows.append([0.3, -0.2, mu, -mu, log_s, log_s])
    params = torch.tensor(rows, dtype=dtype)[None, :, :, None].requires_grad_()
    log_p = dl_all_levels_log_prob(lik, params)
    assert torch.isfinite(log_p).all()
    log_p.sum().backward()
    assert torch.isfinite(params.grad).all()
    # a proper distribution over the levels (loose: the 1e-5 check is test_discretized_logistic_sums_to_one)
    total = log_p.double().exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-4)


def test_discretized_logistic_multidim_is_sum_over_dims():
    """On a [C, H, W] shape, log_prob is the sum over dimensions of each dimension's own 1-D log-probability,
    with the mixture taken per dimension (channels independent) and params broadcast over [K, B]."""
    torch.manual_seed(5)
    m = 2
    lik = DiscretizedLogisticLikelihood(SHAPE, n_mixtures=m)
    lik_1d = DiscretizedLogisticLikelihood((1,), n_mixtures=m)
    params = torch.randn(3, 2, 3 * m, *SHAPE, dtype=F64)
    x = eight_bit(2, *SHAPE, seed=5)
    got = lik.log_prob(params, x)
    assert got.shape == (3, 2)
    flat_params = params.flatten(-3)  # [3, 2, 3m, D]
    flat_x = x.flatten(-3)  # [2, D]
    expected = torch.zeros(3, 2, dtype=F64)
    for dim in range(D):
        expected += lik_1d.log_prob(flat_params[..., dim : dim + 1], flat_x[:, dim : dim + 1])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Categorical


def test_categorical_normalized_and_matches_log_softmax():
    torch.manual_seed(6)
    lik = CategoricalLikelihood((1,))
    assert lik.num_params == 256
    logits = torch.randn(1, 5, 256, 1, dtype=F64) * 5
    log_p = dl_all_levels_log_prob(lik, logits)  # [256, 5]
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(5, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_p, F.log_softmax(logits[0, :, :, 0], -1).T, rtol=1e-12, atol=1e-12)


def test_categorical_multidim_gather():
    torch.manual_seed(7)
    lik = CategoricalLikelihood(SHAPE)
    logits = torch.randn(2, 3, 256, *SHAPE, dtype=F64)
    x = eight_bit(3, *SHAPE, seed=7)
    got = lik.log_prob(logits, x)
    assert got.shape == (2, 3)
    k = (x * 255).round().long()  # [3, C, H, W]
    log_sm = F.log_softmax(logits, dim=2)  # [2, 3, 256, C, H, W]
    expected = log_sm.gather(2, k[None, :, None].expand(2, -1, -1, -1, -1, -1)).squeeze(2).sum((-3, -2, -1))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    # the mean is sum_k p_k k / 255, in [0, 1]
    mean = lik.mean(logits)
    assert mean.shape == (2, 3, *SHAPE)
    expected_mean = (F.softmax(logits, dim=2) * LEVELS.view(256, 1, 1, 1)).sum(2)
    torch.testing.assert_close(mean, expected_mean)


# ----------------------------------------------------------------------------------------------
# Data checks and the registry


def test_check_data_accepts_valid_data():
    BernoulliLikelihood(SHAPE).check_data(torch.bernoulli(torch.full((3, *SHAPE), 0.5)))
    GaussianLikelihood(SHAPE).check_data(torch.rand(3, *SHAPE))
    LearnedGaussianLikelihood(SHAPE).check_data(torch.rand(3, *SHAPE))
    for cls in (DiscretizedLogisticLikelihood, CategoricalLikelihood):
        cls(SHAPE).check_data(eight_bit(3, *SHAPE).float())
        cls((256,)).check_data(LEVELS.float())  # every level, in float32


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_check_data_rejects_nan_and_out_of_range(name):
    lik = build_likelihood(name, SHAPE)
    x = torch.zeros(2, *SHAPE)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ElboxError, match="NaN"):
        lik.check_data(x_nan, "training data")
    x_inf = x.clone()
    x_inf[1, 1, 2, 3] = math.inf
    with pytest.raises(ElboxError, match="infinite"):
        lik.check_data(x_inf)
    for bad in (1.5, -0.1):
        x_bad = x.clone()
        x_bad[0, 1, 1, 1] = bad
        with pytest.raises(ElboxError, match=r"\[0, 1\]") as info:
            lik.check_data(x_bad, "validation data")
        assert "validation data" in str(info.value)


def test_check_data_rejects_non_binary_for_bernoulli():
    x = torch.bernoulli(torch.full((2, *SHAPE), 0.5))
    x[0, 0, 0, 0] = 0.5
    with pytest.raises(ElboxError, match="binary") as info:
        BernoulliLikelihood(SHAPE).check_data(x, "test data")
    assert "test data" in str(info.value)


@pytest.mark.parametrize("cls", [DiscretizedLogisticLikelihood, CategoricalLikelihood])
def test_check_data_rejects_non_8bit(cls):
    for value in (0.5, 0.3 / 255, 100.4 / 255):
        x = eight_bit(2, *SHAPE).float()
        x[1, 1, 1, 1] = value
        with pytest.raises(ElboxError, match="8-bit"):
            cls(SHAPE).check_data(x)


def test_build_likelihood():
    names = ["bernoulli", "bernoulli-ar", "gaussian", "gaussian-learned", "discretized-logistic", "categorical"]
    assert sorted(LIKELIHOODS) == sorted(names)
    assert isinstance(build_likelihood("gaussian", SHAPE, sigma=0.2), GaussianLikelihood)
    assert build_likelihood("gaussian", SHAPE, sigma=0.2).sigma == 0.2
    assert build_likelihood("discretized-logistic", SHAPE, n_mixtures=4).num_params == 12
    with pytest.raises(ElboxError) as info:
        build_likelihood("poisson", SHAPE)
    message = str(info.value)
    assert "poisson" in message
    for name in names:
        assert name in message
    # a model config passes its sigma and n_mixtures to every likelihood; those a likelihood does not take are ignored
    assert type(build_likelihood("bernoulli", SHAPE, sigma=0.1, n_mixtures=3)) is BernoulliLikelihood
    with pytest.raises(ElboxError):
        build_likelihood("discretized-logistic", SHAPE, n_mixtures=0)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_mean_and_sample_are_in_unit_interval(name):
    torch.manual_seed(8)
    lik = build_likelihood(name, SHAPE)
    params = torch.randn(3, lik.num_params, *SHAPE) * 3
    for out in (lik.mean(params), lik.sample(params)):
        assert out.shape == (3, *SHAPE)
        assert torch.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 1
    # samples lie in the likelihood's own data space
    lik.check_data(lik.sample(params))


@pytest.mark.parametrize("name", ["discretized-logistic", "categorical"])
def test_sample_frequencies_match_log_prob(name):
    """Empirical level frequencies of sample() match exp(log_prob) within 4 binomial standard errors."""
    torch.manual_seed(9)
    if name == "discretized-logistic":
        lik = DiscretizedLogisticLikelihood((1,), n_mixtures=2)
        # two components: a sharp one near -0.9 and a broad one at 0.4; weights 0.3 / 0.7
        params = torch.tensor([0.0, math.log(0.7 / 0.3), -0.9, 0.4, -4.0, -1.5], dtype=F64)[None, :, None]
    else:
        lik = CategoricalLikelihood((1,))
        params = (torch.randn(256, dtype=F64) * 2)[None, :, None]
    n = 20000
    draws = lik.sample(params.expand(n, -1, -1))  # [n, 1]
    assert draws.shape == (n, 1)
    lik.check_data(draws)
    counts = torch.bincount((draws[:, 0] * 255).round().long(), minlength=256).to(F64)
    probs = lik.log_prob(params[0], LEVELS[:, None]).exp()  # [256]
    freq = counts / n
    se = (probs * (1 - probs) / n).sqrt()
    # 4 SE per level, plus a floor of 1/n for levels whose probability is ~0 (SE ~ 0)
    assert ((freq - probs).abs() <= 4 * se + 1.0 / n).all()
    assert (probs > 0.01).sum() >= 3  # the check covers several well-populated levels
