"""The pure tensor maths, without PEFT."""

import pytest
import torch

from nlora import nystrom


def decaying(m: int, n: int, base: float = 0.9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (u * base ** torch.arange(k).float()) @ v.T


def test_reference_factors_are_the_slicing_formulas_exactly():
    w = torch.randn(24, 40)
    f = nystrom.reference_factors(w, 5)
    assert torch.equal(f.A, w[:5, :]) and torch.equal(f.N, w[:5, :5]) and torch.equal(f.B, w[:, :5])
    assert torch.equal(nystrom.delta_weight(f, 1.0), w[:, :5] @ (w[:5, :5] @ w[:5, :]))


@pytest.mark.parametrize("r", [4, 8, 16])
@pytest.mark.parametrize("landmarks", [None, *nystrom.LANDMARKS])
def test_default_nystrom_is_within_1_5x_of_the_svd_optimum(r, landmarks):
    # None: NLoraConfig's defaults (project, norm, r/4); the others: the two-sided core with 2r landmarks
    # (with r/4 extra landmarks only norm ones stay within 1.5x, here and on real weights: docs/benchmarks.md §1b)
    from nlora import NLoraConfig

    w = decaying(64, 96)
    config = NLoraConfig() if landmarks is None else NLoraConfig(nystrom_core="lstsq", nystrom_oversample=1.0)
    landmarks = landmarks or config.nystrom_landmarks
    f = nystrom.nystrom_factors(w, r, landmarks=landmarks, core=config.nystrom_core,
                                oversample=config.oversampled_rank(r, 64) - r,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    error, optimum = nystrom.relative_error(w, f, 1.0), nystrom.svd_optimal_error(w, r)
    assert optimum < error <= 1.5 * optimum


def test_plain_pinv_of_first_landmarks_is_far_worse_than_lstsq():
    # Why the default is the least-squares core: on a general matrix pinv(W[:r,:r]) adds energy (notes §6.1).
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    pinv = nystrom.nystrom_factors(w, 16, landmarks="first", core="pinv", rcond=0.0)
    lstsq = nystrom.nystrom_factors(w, 16, landmarks="first", core="lstsq")
    assert nystrom.relative_error(w, pinv, 1.0) > 1.0 >= nystrom.relative_error(w, lstsq, 1.0)


@pytest.mark.parametrize("core", nystrom.CORES)
@pytest.mark.parametrize("orthonormal", [True, False])
def test_factor_shapes_rank_and_orthonormality(core, orthonormal):
    w = decaying(30, 50)
    if core == "project" and not orthonormal:
        with pytest.raises(ValueError, match="orthonormal"):
            nystrom.nystrom_factors(w, 6, core=core, orthonormal=orthonormal)
        return
    f = nystrom.nystrom_factors(w, 6, core=core, orthonormal=orthonormal, scaling=2.0)
    assert f.A.shape == (6, 50) and f.N.shape == (6, 6) and f.B.shape == (30, 6)
    assert torch.linalg.matrix_rank(nystrom.delta_weight(f, 2.0)) <= 6
    if orthonormal:
        torch.testing.assert_close(f.B.T @ f.B, torch.eye(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(6), atol=1e-5, rtol=0)
    if core in ("lstsq", "project"):  # scaling is compensated in N: s*B*N*A is the same approximation for any s
        g = nystrom.nystrom_factors(w, 6, core=core, orthonormal=orthonormal, scaling=1.0)
        torch.testing.assert_close(nystrom.delta_weight(f, 2.0), nystrom.delta_weight(g, 1.0), atol=1e-5, rtol=1e-4)


def test_random_landmarks_are_seeded_by_the_generator_not_the_global_rng():
    w = torch.randn(40, 60)
    torch.manual_seed(1)
    a = nystrom.select_landmarks(w, 8, "random", torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b = nystrom.select_landmarks(w, 8, "random", torch.Generator().manual_seed(7))
    c = nystrom.select_landmarks(w, 8, "random", torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))


def test_norm_landmarks_pick_the_heaviest_rows_and_columns():
    w = torch.zeros(10, 12)
    w[7, :] = 5.0
    w[:, 3] = 4.0
    rows, cols = nystrom.select_landmarks(w, 1, "norm")
    assert rows.tolist() == [7] and cols.tolist() == [3]


def test_invalid_rank_and_options_raise():
    w = torch.randn(8, 10)
    with pytest.raises(ValueError, match="Rank r=9"):
        nystrom.nystrom_factors(w, 9)
    with pytest.raises(ValueError, match="Unknown landmark"):
        nystrom.nystrom_factors(w, 2, landmarks="nope")
    with pytest.raises(ValueError, match="Unknown core"):
        nystrom.nystrom_factors(w, 2, core="nope")


def test_slora_factors_start_at_zero_delta():
    f = nystrom.slora_factors(12, 20, 4, torch.Generator().manual_seed(0))
    assert f.A.abs().sum() > 0 and f.N.abs().sum() > 0 and torch.count_nonzero(f.B) == 0


def test_init_fingerprint_follows_the_dtype_and_catches_a_scaled_or_other_weight():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 24, generator=g))
    w = u @ torch.diag(0.7 ** torch.arange(24.0)) @ v.T  # a decaying spectrum, like trained weights

    def fp(weight):
        return nystrom.init_fingerprint(weight, nystrom.nystrom_factors(weight.float(), 4))

    reference = fp(w)
    for same in (w + 1e-7 * torch.randn_like(w), w.bfloat16()):  # a bf16 copy of the same base
        assert nystrom.same_base(reference, fp(same)) and nystrom.same_factors(reference, fp(same))
    for other in (w * 1.5, w.flip(0), torch.randn_like(w)):  # orthonormal A, B are scale-free: W's norm is not
        assert not nystrom.same_base(reference, fp(other))


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
@pytest.mark.parametrize("landmarks", nystrom.LANDMARKS)
def test_projection_core_beats_the_two_sided_core_and_reaches_the_svd_with_all_landmarks(shape, landmarks):
    w = decaying(*shape)
    for oversample in (0, 3):
        gen = torch.Generator().manual_seed(0)
        project = nystrom.nystrom_factors(w, 6, landmarks=landmarks, core="project", oversample=oversample,
                                          generator=gen)  # fmt: skip
        lstsq = nystrom.nystrom_factors(w, 6, landmarks=landmarks, oversample=oversample, generator=gen)
        # the same landmarks on the short side: projecting onto their span is the best in that span
        e_project = nystrom.relative_error(w, project, 1.0)
        assert nystrom.svd_optimal_error(w, 6) <= e_project + 1e-6
        if landmarks in ("first", "norm"):  # deterministic landmarks: the two cores see the same columns
            assert e_project <= nystrom.relative_error(w, lstsq, 1.0) + 1e-6
        # the error the layer reports without a pass over W is the true one
        captured = (1 - project.captured_energy / w.pow(2).sum().item()) ** 0.5
        assert abs(captured - e_project) < 1e-4
    every = nystrom.nystrom_factors(w, 6, core="project", oversample=min(shape))
    assert nystrom.relative_error(w, every, 1.0) == pytest.approx(nystrom.svd_optimal_error(w, 6), abs=1e-5)


def test_projection_factors_of_the_transpose_are_the_transposed_factors():
    w = decaying(30, 50)
    f = nystrom.nystrom_factors(w, 6, landmarks="norm", core="project", oversample=2)
    g = nystrom.nystrom_factors(w.T.contiguous(), 6, landmarks="norm", core="project", oversample=2)
    torch.testing.assert_close(nystrom.delta_weight(f, 1.0).T, nystrom.delta_weight(g, 1.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("landmarks", ["norm", "first"])
def test_square_row_landmarks_are_the_column_landmarks_of_the_transpose(landmarks):
    """``square_landmarks`` picks the side of a square W: rows of W are columns of W^T, so the two settings give
    transposed approximations of transposed matrices, both within the default's quality bound."""
    w = decaying(36, 36)
    rows = nystrom.nystrom_factors(w, 6, landmarks=landmarks, core="project", oversample=2, square_landmarks="rows")
    cols_of_t = nystrom.nystrom_factors(w.T.contiguous(), 6, landmarks=landmarks, core="project", oversample=2,
                                        square_landmarks="columns")  # fmt: skip
    torch.testing.assert_close(nystrom.delta_weight(rows, 1.0), nystrom.delta_weight(cols_of_t, 1.0).T, atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    assert rows.rows is not None and rows.cols is None and cols_of_t.cols is not None
    optimum = nystrom.svd_optimal_error(w, 6)
    for side in ("rows", "columns"):
        f = nystrom.nystrom_factors(w, 6, landmarks=landmarks, core="project", oversample=2, square_landmarks=side)
        assert nystrom.relative_error(w, f, 1.0) <= 1.5 * optimum
        assert f.A.is_contiguous() and f.B.is_contiguous()
    with pytest.raises(ValueError, match="square_landmarks"):
        nystrom.nystrom_factors(w, 6, core="project", square_landmarks="diagonal")


@pytest.mark.parametrize("tall", [True, False])
@pytest.mark.parametrize("landmark_spread", [None, 1e-3, 0.0])
def test_projection_is_the_truncated_projection_onto_the_landmarks_however_conditioned(tall, landmark_spread):
    """The landmark basis comes from the sketch's Gram matrix (well-conditioned landmarks), from a QR and the same
    sketch (cond > 1e3: two landmarks 1e-3 apart), or from a QR and a second product (two equal landmarks): each is
    the best rank-r part of W projected onto the span of its landmarks, with orthonormal A and B."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 40, generator=g, dtype=torch.float64)
    if landmark_spread is not None:  # "first" landmarks: rows (tall) or columns 0..k-1; make the first two close
        w[1] = w[0] + landmark_spread * torch.randn(40, generator=g, dtype=torch.float64)
    w = w if tall else w.T.contiguous()  # wide: the landmarks are its columns
    r, k = 4, 6
    f = nystrom.nystrom_factors(w.float(), r, landmarks="first", core="project", oversample=k - r)
    span = w[:k].T if tall else w[:, :k]  # landmark vectors on the short side
    u, s, _ = torch.linalg.svd(span, full_matrices=False)
    q = u[:, s > 1e-9 * s[0]]
    projected = w @ q @ q.T if tall else q @ q.T @ w
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    if landmark_spread == 0.0:  # the QR completes the dependent landmarks' span with some direction: never worse
        error = torch.linalg.matrix_norm(w - nystrom.delta_weight(f, 1.0).double())
        assert error <= torch.linalg.matrix_norm(w - best) * (1 + 1e-5)
    else:
        torch.testing.assert_close(nystrom.delta_weight(f, 1.0).double(), best, atol=1e-4 * s[0].item(), rtol=0)
    eye = torch.eye(r)
    torch.testing.assert_close(f.A @ f.A.T, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(f.B.T @ f.B, eye, atol=1e-4, rtol=0)


def test_row_and_column_norms_match_vector_norm_in_either_memory_order():
    w = torch.randn(700, 33)
    for view in (w, w.T.contiguous().T, w.bfloat16(), w.bfloat16().T.contiguous().T):  # Conv1D/embeddings: .T views
        torch.testing.assert_close(nystrom.column_norms(view), torch.linalg.vector_norm(view.float(), dim=0))
        torch.testing.assert_close(nystrom.row_norms(view), torch.linalg.vector_norm(view.float(), dim=1))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_base_fingerprint_is_the_same_whether_the_landmark_pass_computed_the_norms_or_not(shape):
    w = decaying(*shape)
    factors = nystrom.nystrom_factors(w, 4, landmarks="norm", core="project", oversample=2)
    # row landmarks (tall or square W): the row norms come for free
    assert (factors.weight_row_norms is not None) == (shape[0] >= shape[1])
    fresh = nystrom.weight_fingerprint(w)
    tolerance = 1e-6 * fresh[0]  # same_base compares both numbers relative to the norm
    assert nystrom.init_fingerprint(w, factors)[:2] == pytest.approx(fresh, abs=tolerance)
    assert nystrom.weight_fingerprint(w.T.contiguous().T) == pytest.approx(fresh, abs=tolerance)
