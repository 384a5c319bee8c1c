import numpy as np
import pytest

from krea2.eval.fid import fid, frechet_distance


def test_frechet_distance_hand_computed_cases():
    # 1-D: N(0, 1) vs N(2, 4): (0 - 2)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 5
    assert frechet_distance(np.zeros(1), np.eye(1), np.full(1, 2.0), 4 * np.eye(1)) == pytest.approx(5.0)
    # diagonal: mu diff (1, 2), covs diag(1, 4) and diag(4, 9): 5 + 18 - 2 * (2 + 6) = 7
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]),
                            np.diag([4.0, 9.0])) == pytest.approx(7.0)
    # commuting full covariances S and 4S: tr(S + 4S - 2 * 2S) = tr S
    a = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]])
    mu = np.array([0.5, -1.0, 2.0])
    assert frechet_distance(mu, a, np.zeros(3), 4 * a) == pytest.approx(np.trace(a) + (mu**2).sum())


def test_fid_of_samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    shifted = fid(x, x + np.array([3.0, 0.0, 4.0]))  # a pure mean shift costs |shift|^2
    assert shifted == pytest.approx(25.0, rel=1e-6)
    scaled = fid(x, 2 * x)  # sample cov C vs 4C: tr C, about 3
    assert scaled == pytest.approx(3.0, rel=0.1)
    singular = np.c_[x[:, :1], np.zeros((4000, 2))]  # rank-deficient covariances stay finite and >= 0
    assert 0 <= fid(singular, singular + 1) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError):
        fid(x[:1], x)
