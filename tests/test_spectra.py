"""The probe's singular values (float64 Gram matrix, eigenvalues only) against float64 SVD: the
largest error relative to σ1, the error of the smallest singular values relative to themselves,
and the summaries built on them, at GPT-2's shapes (square, 4:1 and 1:4)."""

import math

import pytest
import torch

from modeconn.spectra import singular_values_of, summarize, svdvals_reference

N = 768 // 4  # gpt2's matrices at a quarter of the width: the same aspect ratios, seconds not minutes


def with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """An m × n float32 matrix whose singular values are `sigma` (min(m, n) of them)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), dtype=torch.float64, generator=gen))
    return ((u * sigma) @ v.T).float()


@pytest.mark.parametrize("shape", [(N, N), (4 * N, N), (N, 4 * N)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("condition", [1e1, 1e3, 1e4])
def test_gram_singular_values_match_float64_svd(shape, condition):
    k = min(shape)
    sigma = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64) * 3.0  # σ1 = 3, σ_min = 3/condition
    w = with_spectrum(*shape, sigma, seed=int(condition) + shape[0])
    reference = svdvals_reference(w).double()  # of the float32 matrix itself
    (ours,) = singular_values_of([w])
    ours = ours.double()
    assert ours.shape == reference.shape and bool((ours[:-1] >= ours[1:]).all())
    # every σ within 1e-6 of σ1 (float32 rounding of the outputs is 6e-8 relative)
    assert ((ours - reference).abs().max() / reference[0]).item() < 1e-6
    # the smallest within n·ε·(σ1/σ_min)² relative to itself, the stated bound, plus output rounding
    bound = k * 2.0 ** -52 * condition ** 2 + 2 * 2.0 ** -24
    assert (abs(ours[-1] - reference[-1]) / reference[-1]).item() < bound
    for key, value in summarize(ours.float()).items():
        expected = summarize(reference.float())[key]
        assert value == pytest.approx(expected, rel=1e-6), key


def test_gaussian_matrices_of_every_block_shape_in_one_batched_call():
    """Random (untrained-like) weights of several shapes at once: the batching by shape gives each
    matrix its own values."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(N, N), (4 * N, N), (N, 4 * N), (N, N), (4 * N, N), (3, 5)]
    matrices = [torch.randn(*s, generator=gen) * 0.02 for s in shapes]
    for w, ours in zip(matrices, singular_values_of(matrices)):
        reference = svdvals_reference(w).double()
        assert ((ours.double() - reference).abs().max() / reference[0]).item() < 1e-6
        assert (abs(ours[-1].double() - reference[-1]) / reference[-1]).item() < 1e-5


def test_a_rank_deficient_matrix_gives_zeros_not_nans():
    w = with_spectrum(64, 32, torch.tensor([2.0] * 8 + [0.0] * 24, dtype=torch.float64), seed=3)
    (ours,) = singular_values_of([w])
    assert torch.isfinite(ours).all() and (ours >= 0).all()
    assert torch.allclose(ours[:8], torch.full((8,), 2.0), rtol=1e-6)
    assert ours[8:].max().item() < math.sqrt(32 * 2.0 ** -52) * 2.0 * 10  # noise below √(n·ε)·σ1
