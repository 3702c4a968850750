"""ModelMix and LLaVA-c spectral-aware consolidation (SAC): hand cases and path agreement."""

from __future__ import annotations

import pytest
import torch

from cl_bench.errors import CLBenchError
from methods.llava_c.consolidation import (
    apply_sac,
    check_alpha,
    lora_spectrum,
    modelmix_delta,
    sac_delta,
    sac_lora_factors,
    sac_scale,
    sac_window,
)

S421 = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)


def spectrum_of(s: list[float]) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.float64)


def brute_force_window(s: list[float], alpha: float) -> int:
    """Eq. 7 / Algorithm 1 line 9 with a plain loop over k."""
    r = len(s)
    errs = [(sum(s[: min(k + 1, r)]) / k - alpha * s[0]) ** 2 for k in range(1, r + 1)]
    return errs.index(min(errs)) + 1


def matrix_with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def lora(m: int, n: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, q, generator=g), torch.randn(q, n, generator=g) / n**0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


# s = (4, 2, 1), alpha = 0.5, target alpha * s_1 = 2. Window means (1/k) sum_{j<=min(k+1,3)} s_j:
# k=1: 6 -> (6-2)^2 = 16; k=2: 7/2 -> 2.25; k=3: 7/3 -> 1/9. So k = 3.
# pad, s' = (4, 2, 1, 1, 1, 1): s~ = ((4+2+1+1)/3, (2+1+1+1)/3, (1+1+1+1)/3) = (8/3, 5/3, 4/3).
# truncate: s~ = ((4+2+1)/3, (2+1)/3, 1/3) = (7/3, 1, 1/3).
def test_hand_case_k3() -> None:
    assert sac_window(S421, 0.5) == 3
    assert torch.allclose(sac_scale(S421, 0.5), spectrum_of([8 / 3, 5 / 3, 4 / 3]))
    assert torch.allclose(sac_scale(S421, 0.5, "truncate"), spectrum_of([7 / 3, 1, 1 / 3]))


# s = (8, 1, 1), alpha = 1, target 8. k=1: 8+1 = 9 -> 1; k=2: 10/2 = 5 -> 9; k=3: 10/3 -> 21.8.
# So k = 1. pad, s' = (8, 1, 1, 1): s~ = (8+1, 1+1, 1+1) = (9, 2, 2); truncate: (9, 2, 1).
def test_hand_case_k1() -> None:
    s = spectrum_of([8, 1, 1])
    assert sac_window(s, 1.0) == 1
    assert torch.equal(sac_scale(s, 1.0), spectrum_of([9, 2, 2]))
    assert torch.equal(sac_scale(s, 1.0, "truncate"), spectrum_of([9, 2, 1]))


# s = (4, 0, 0, 0), alpha = 0.75, target 3: k=1: 4 -> 1; k=2: 4/2 = 2 -> 1 (tie); k=3: 4/3;
# k=4: 1. The tie between k=1 and k=2 goes to k = 1, so s~ = s.
def test_ties_go_to_the_smallest_k() -> None:
    s = spectrum_of([4, 0, 0, 0])
    assert sac_window(s, 0.75) == 1
    assert torch.equal(sac_scale(s, 0.75), s)
    # all-zero spectrum: every k ties at 0, so k = 1 and the update stays zero
    assert sac_window(torch.zeros(5), 0.3) == 1
    assert torch.equal(sac_delta(torch.zeros(4, 6), 0.3), torch.zeros(4, 6))


# alpha = 0: the target is 0 and the window means never increase with k (k s_{k+2} <= S_{k+1}),
# strictly dropping at k = r (S_r / r < S_r / (r-1)), so k = r: SAC with alpha = 0 does NOT zero the
# update. For (4, 2, 1): k = 3, i.e. the same s~ as alpha = 0.5 above.
def test_alpha_zero_takes_the_widest_window() -> None:
    assert sac_window(S421, 0.0) == 3
    assert torch.allclose(sac_scale(S421, 0.0), spectrum_of([8 / 3, 5 / 3, 4 / 3]))
    s = torch.sort(torch.rand(17, dtype=torch.float64), descending=True).values
    assert sac_window(s, 0.0) == 17
    assert modelmix_delta(torch.ones(3), 0.0).eq(0).all()


# alpha = 1: target s_1 = 4 for (4, 2, 1): k=1: 6 -> 4; k=2: 7/2 -> 0.25; k=3: 7/3 -> 2.78: k = 2.
# pad, s' = (4, 2, 1, 1, 1): s~ = (7/2, 4/2, 3/2); truncate: (7/2, 3/2, 1/2). Not the identity.
def test_alpha_one_is_not_the_identity() -> None:
    assert sac_window(S421, 1.0) == 2
    assert torch.equal(sac_scale(S421, 1.0), spectrum_of([3.5, 2.0, 1.5]))
    assert torch.equal(sac_scale(S421, 1.0, "truncate"), spectrum_of([3.5, 1.5, 0.5]))


def test_vectorised_window_matches_the_loop() -> None:
    g = torch.Generator().manual_seed(3)
    for r in (1, 2, 5, 40):
        s = torch.sort(torch.rand(r, generator=g, dtype=torch.float64), descending=True).values
        for alpha in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
            assert sac_window(s, alpha) == brute_force_window(s.tolist(), alpha)


def test_full_path_rescales_the_singular_values() -> None:
    delta = matrix_with_spectrum(S421, 7, 3)  # r = min(7, 3) = 3
    out = sac_delta(delta, 0.5)
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out, spectrum_of([8 / 3, 5 / 3, 4 / 3]), atol=1e-10)
    s_trunc = torch.linalg.svdvals(sac_delta(delta, 0.5, "truncate"))
    assert torch.allclose(s_trunc, spectrum_of([7 / 3, 1, 1 / 3]), atol=1e-10)


@pytest.mark.parametrize("boundary", ["pad", "truncate"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize(("m", "n", "q"), [(12, 40, 4), (40, 12, 5), (24, 24, 6), (6, 30, 8)])
def test_factored_path_matches_full_path(
    m: int, n: int, q: int, alpha: float, boundary: str
) -> None:
    B, A = lora(m, n, q, seed=m * n + q)
    full = sac_delta(2.0 * B @ A, alpha, boundary)
    P, Q = sac_lora_factors(B, A, 2.0, alpha, boundary)
    assert P.shape == (m, min(q, m, n)) and Q.shape == (min(q, m, n), n)
    assert P.dtype == Q.dtype == B.dtype
    assert rel_err(P @ Q, full) < 1e-4


def test_factored_path_float32_at_moderate_size() -> None:
    B, A = lora(300, 260, 16, seed=1)  # above the float64 threshold: QR in float32
    full = sac_delta(0.5 * (B.double() @ A.double()), 0.2)
    P, Q = sac_lora_factors(B, A, 0.5, 0.2)
    assert P.dtype == torch.float32
    assert rel_err(P @ Q, full) < 1e-4


def test_one_decomposition_serves_an_alpha_sweep() -> None:
    B, A = lora(20, 30, 4, seed=7)
    spectrum = lora_spectrum(B, A, 1.5)
    assert spectrum.rank == 20 and spectrum.s.shape == (4,)
    for alpha in torch.linspace(0, 1, 11).tolist():
        P, Q = apply_sac(spectrum, alpha)
        P2, Q2 = sac_lora_factors(B, A, 1.5, alpha)
        assert torch.allclose(P @ Q, P2 @ Q2, atol=1e-6)


def test_low_precision_input_keeps_its_dtype() -> None:
    B, A = lora(16, 24, 4, seed=2)
    P, Q = sac_lora_factors(B.bfloat16(), A.bfloat16(), 2.0, 0.2)
    assert P.dtype == Q.dtype == torch.bfloat16
    assert sac_delta((B @ A).half(), 0.2).dtype == torch.float16


def test_conv_shaped_delta_round_trips_its_shape() -> None:
    delta = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    out = sac_delta(delta, 0.3)
    assert out.shape == delta.shape
    assert torch.allclose(out.reshape(8, 27), sac_delta(delta.reshape(8, 27), 0.3))


def test_one_dimensional_delta_gets_modelmix() -> None:
    bias = torch.tensor([1.0, -2.0, 4.0])
    assert torch.equal(sac_delta(bias, 0.25), torch.tensor([0.25, -0.5, 1.0]))
    assert torch.equal(modelmix_delta(bias, 0.25), sac_delta(bias, 0.25))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.2", True])
def test_bad_alpha_raises(alpha: object) -> None:
    B, A = lora(6, 5, 2, seed=0)
    calls = [
        lambda: check_alpha(alpha),
        lambda: sac_window(S421, alpha),
        lambda: sac_scale(S421, alpha),
        lambda: sac_delta(B @ A, alpha),
        lambda: sac_delta(torch.ones(3), alpha),
        lambda: modelmix_delta(B @ A, alpha),
        lambda: sac_lora_factors(B, A, 1.0, alpha),
        lambda: apply_sac(lora_spectrum(B, A, 1.0), alpha),
    ]
    for call in calls:
        with pytest.raises(CLBenchError, match="alpha"):
            call()


def test_bad_boundary_names_the_valid_ones() -> None:
    B, A = lora(6, 5, 2, seed=0)
    calls = [
        lambda: sac_scale(S421, 0.2, "reflect"),
        lambda: sac_delta(B @ A, 0.2, "reflect"),
        lambda: sac_lora_factors(B, A, 1.0, 0.2, "reflect"),
        lambda: apply_sac(lora_spectrum(B, A, 1.0), 0.2, "reflect"),
    ]
    for call in calls:
        with pytest.raises(CLBenchError, match="'pad', 'truncate'"):
            call()


def test_bad_spectra_and_factors_raise() -> None:
    with pytest.raises(CLBenchError, match="descending"):
        sac_window(spectrum_of([1, 2]), 0.2)
    with pytest.raises(CLBenchError, match="1-D"):
        sac_window(torch.zeros(0), 0.2)
    with pytest.raises(CLBenchError, match="M x q"):
        lora_spectrum(torch.ones(4, 2), torch.ones(3, 5), 1.0)
