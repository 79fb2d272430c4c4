"""Pure tensor maths for NLoRA: Nyström/CUR factors, SLoRA factors and residuals.

Everything here works on plain tensors in the PyTorch convention (``W`` is ``out x in``) and knows nothing
about PEFT, so it can be tested and benchmarked alone. A rank-r adapter is ``delta_W = s * B @ N @ A`` with
``A`` r x in, ``N`` r x r and ``B`` out x r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LANDMARKS = ("first", "random", "norm", "leverage")
CORES = ("project", "lstsq", "pinv", "ridge", "block")


@dataclass
class Factors:
    """Adapter factors ``delta_W = scaling * B @ N @ A`` plus the landmarks they came from (if any)."""

    A: torch.Tensor
    N: torch.Tensor
    B: torch.Tensor
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    # ||s B N A||_F^2 when s B N A is an orthogonal projection of W (lstsq core, orthonormal factors): then
    # ||W - s B N A||^2 = ||W||^2 - captured_energy, so the error needs no extra pass over W
    captured_energy: float | None = None
    weight_norm_sq: float | None = None  # ||W||_F^2 when the landmark pass computed it anyway (saves a pass)
    weight_row_norms: torch.Tensor | None = None  # W's row norms, likewise (the base fingerprint reuses them)


def select_landmarks(
    weight: torch.Tensor, k: int, method: str = "first", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` landmark row indices ``I`` and column indices ``J`` of ``weight`` (out x in).

    ``first`` is the paper's top-left block; ``random`` samples uniformly with ``generator``; ``norm`` takes the
    rows/columns of largest norm (one cheap pass); ``leverage`` takes the largest leverage scores of a Gaussian
    sketch of width ``k + 10`` (two passes over W, better on incoherent matrices).
    """
    m, n = weight.shape
    if method == "first":
        return torch.arange(k), torch.arange(k)
    if method == "random":
        rows = torch.randperm(m, generator=generator)[:k].sort().values
        cols = torch.randperm(n, generator=generator)[:k].sort().values
        return rows, cols
    if method == "norm":
        w = weight.float()
        rows = torch.topk(row_norms(w), k).indices.sort().values
        cols = torch.topk(column_norms(w), k).indices.sort().values
        return rows, cols
    if method == "leverage":
        w = weight.float()
        width = min(k + 10, m, n)
        omega_in = torch.randn(n, width, generator=generator).to(w.device)
        omega_out = torch.randn(m, width, generator=generator).to(w.device)
        q_rows = torch.linalg.qr(w @ omega_in).Q  # basis of the column space: row leverage scores
        q_cols = torch.linalg.qr(w.T @ omega_out).Q  # basis of the row space: column leverage scores
        rows = torch.topk(q_rows.pow(2).sum(1), k).indices.sort().values
        cols = torch.topk(q_cols.pow(2).sum(1), k).indices.sort().values
        return rows, cols
    raise ValueError(f"Unknown landmark method {method!r}; choose one of {LANDMARKS}.")


def column_norms(w: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Euclidean norms of the columns of ``w``, a block of rows at a time: ``vector_norm(w, dim=0)`` on row-major
    memory reduces across strides and costs ~6 products W·X (X in x 32) on CPU; this costs ~0.3."""
    if w.stride(0) == 1 and w.stride(1) != 1:  # a transposed view (Conv1D, embeddings): its columns are contiguous
        return torch.linalg.vector_norm(w.T.float(), dim=1)
    acc = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], block):
        rows = w[start : start + block].float()
        acc += (rows * rows).sum(0)
    return acc.sqrt()


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of ``w``, read along its memory order (see :func:`column_norms`)."""
    return column_norms(w.T)


def _core_inverse(U: torch.Tensor, core: str, rcond: float) -> torch.Tensor:
    """Stable (pseudo-)inverse of the landmark block ``U = W[I, J]``."""
    if core == "block":  # the authors' release: the raw block, no inverse
        return U
    if core == "pinv":  # truncated pseudo-inverse: singular values below rcond * s_max are dropped
        return torch.linalg.pinv(U, rtol=rcond)
    if core == "ridge":  # (U^T U + lam I)^-1 U^T with lam = (rcond * s_max)^2
        lam = (rcond * torch.linalg.matrix_norm(U, ord=2)) ** 2
        eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
        return torch.linalg.solve(U.T @ U + lam * eye, U.T)
    raise ValueError(f"Unknown core {core!r}; choose one of {CORES}.")


def nystrom_factors(
    weight: torch.Tensor,
    r: int,
    *,
    landmarks: str = "first",
    core: str = "lstsq",
    oversample: int = 0,
    rcond: float = 1e-2,
    orthonormal: bool = True,
    scaling: float = 1.0,
    generator: torch.Generator | None = None,
    square_landmarks: str = "rows",
) -> Factors:
    """Nyström (CUR) factors of ``weight`` so that ``scaling * B @ N @ A`` approximates it with rank <= r.

    ``core="project"`` (the NLoraConfig default) projects W onto the span of its k landmark columns (rows, if W is
    taller than wide) and truncates to rank r: ``W ~ C C^+ W``, one product of W with k vectors. With
    ``C = W[:, J]``, ``R = W[I, :]`` and ``U = W[I, J]`` the other cores give ``C @ core @ R``, where the core is
    the least-squares ``C^+ W R^+`` (``lstsq``, never worse than 0 and within a small factor of the SVD optimum),
    a truncated ``pinv(U)``, a ridge inverse of ``U``, or ``U`` itself (``block``, what the authors' code does;
    not an approximation of W). ``orthonormal=True`` re-expresses the same product with orthonormal
    ``B`` and ``A`` (all scale in N), which is better conditioned for training; ``orthonormal=False`` keeps the
    skeleton form ``B = C``, ``A = R``. ``oversample`` takes ``r + oversample`` landmarks and truncates the core
    back to rank r with a small SVD. ``square_landmarks`` is the side a square W's landmarks are taken on by the
    ``project`` core (``rows``: contiguous rows and W times the basis, cheaper on row-major memory than ``columns``,
    the choice before nlora 0.2). All arithmetic is fp32; results are fp32.
    """
    m, n = weight.shape
    if not 0 < r <= min(m, n):
        raise ValueError(f"Rank r={r} must be in [1, min(out, in)={min(m, n)}].")
    if core == "project" and not orthonormal:
        raise ValueError("core='project' gives orthonormal factors only; set orthonormal=True or another core.")
    if oversample and not orthonormal:
        raise ValueError("oversample > 0 needs orthonormal=True (a skeleton CUR cannot be truncated).")
    w = weight.detach().float()
    k = min(r + max(oversample, 0), m, n)
    if core == "project":
        if square_landmarks not in ("rows", "columns"):
            raise ValueError(f"Unknown square_landmarks {square_landmarks!r}; choose 'rows' or 'columns'.")
        tall = m > n or (m == n and square_landmarks == "rows")
        return _projection_factors(w, r, k, landmarks, scaling, generator, tall)
    rows, cols = select_landmarks(w, k, landmarks, generator)
    rows, cols = rows.to(w.device), cols.to(w.device)
    C, R = w[:, cols], w[rows, :]

    if core == "lstsq":
        q_c, q_r = torch.linalg.qr(C).Q, torch.linalg.qr(R.T).Q
        B, N, A = q_c, q_c.T @ (w @ q_r), q_r.T  # the only pass over W at matrix-product cost
    else:
        inner = _core_inverse(w[rows][:, cols], core, rcond)
        if orthonormal:
            q_c, t_c = torch.linalg.qr(C)
            q_r, t_r = torch.linalg.qr(R.T)
            B, N, A = q_c, t_c @ inner @ t_r.T, q_r.T
        else:
            B, N, A = C, inner, R

    if k > r:  # best rank-r part of the small core, kept in orthonormal form
        u, s, vh = torch.linalg.svd(N)
        B, N, A = B @ u[:, :r], torch.diag(s[:r]), vh[:r] @ A
    energy = N.pow(2).sum().item() if core == "lstsq" else None
    return Factors(
        A=A.contiguous(), N=(N / scaling).contiguous(), B=B.contiguous(), rows=rows, cols=cols, captured_energy=energy
    )


# The largest condition number of the landmarks' Gram matrix (read off the fp32 sketch) for the QR-free basis: its
# rounding, ~1e-6 relative, is amplified this much in the orthonormality of A and B.
_GRAM_CONDITION = 1e3
_TRIANGLE_CONDITION = 1e-4  # smallest |diagonal| of the QR's triangle, relative to the largest, to solve with it


def _times_wide_t(wide: torch.Tensor, x: torch.Tensor, w_left: bool) -> torch.Tensor:
    """``wide^T @ x`` (long x k), with W as the left operand of the product or as the right one."""
    return wide.T @ x if w_left else (x.T @ wide).T


def _projection_factors(
    w: torch.Tensor, r: int, k: int, landmarks: str, scaling: float, generator: torch.Generator | None, tall: bool
) -> Factors:
    """``W ~ Q Q^T W`` truncated to rank r, with Q an orthonormal basis of k landmark columns of W (of k landmark
    rows when ``tall``: W taller than wide, so Q lives on the smaller side, or square with row landmarks). One
    product of W with k vectors and a few k x k factorisations: the cheapest way to a near-optimal residual (see
    docs/benchmarks.md)."""
    wide = w.T if tall else w  # short side first: landmarks are columns of ``wide``
    norm_sq = norms = None
    if landmarks == "norm":  # one norm pass, over the side that is used; ||W||^2 comes with it
        norms = row_norms(w) if tall else column_norms(w)
        picked = torch.topk(norms, k).indices.sort().values
        norm_sq = norms.pow(2).sum().item()
    else:
        picked = select_landmarks(wide, k, landmarks, generator)[1].to(w.device)
    # index_select on W's own rows or columns: 10x faster than w[:, idx], and than selecting through the w.T view
    block = w.index_select(0, picked) if tall else w.index_select(1, picked)  # k x in, or out x k
    landmark_vectors = block.T if tall else block  # short x k: L
    # long x k: the only pass over W at matrix-product cost (W L for row landmarks). CPU BLAS is ~20% faster with W
    # as the left operand, except a transposed W times fewer than ~12 vectors (4x slower; bench/init_sweep.py)
    sketch = _times_wide_t(wide, landmark_vectors, tall or k > 12)
    # An orthonormal basis Q = L R^-T of the landmarks without a QR: the sketch holds their Gram matrix L^T L = R R^T
    # (its landmark rows), so W^T Q = sketch R^-T costs nothing more. Cholesky squares L's condition number: where
    # the landmarks are less well conditioned, a QR L = Q T gives W^T Q = sketch T^-1, and where they are (nearly)
    # dependent, a second product W^T Q.
    gram = sketch[picked].double()
    gram = (gram + gram.T) / 2
    spectrum = torch.linalg.eigvalsh(gram)  # 1 ms at k = 160, against 6.5 for the QR it saves
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0 and spectrum[0].item() * _GRAM_CONDITION > spectrum[-1].item():
        # top-r singular pairs of the sketch from its k x k Gram matrix (3x cheaper than an SVD; only the top r
        # are used, which sit far above the Gram matrix's rounding): wide ~ (Q u) diag(s) (W^T Q u / s)^T
        whitened = torch.linalg.solve_triangular(chol, (sketch.T @ sketch).double(), upper=False)
        energy, u = torch.linalg.eigh(torch.linalg.solve_triangular(chol, whitened.T, upper=False))
        u = torch.linalg.solve_triangular(chol.T, u[:, -r:].flip(1), upper=True).float()  # R^-T u: Q u = L u'
        basis = landmark_vectors
    else:
        basis, triangle = torch.linalg.qr(landmark_vectors)
        diag = triangle.diagonal().abs()
        if diag.min().item() > _TRIANGLE_CONDITION * diag.max().item():
            sketch = torch.linalg.solve_triangular(triangle, sketch, upper=True, left=False)
        else:
            sketch = _times_wide_t(wide, basis, tall or k > 12)
        energy, u = torch.linalg.eigh((sketch.T @ sketch).double())
        u = u[:, -r:].flip(1).float()
    s = energy[-r:].flip(0).clamp_min(0).sqrt().float()
    inv_s = 1 / s.clamp_min(torch.finfo(torch.float32).tiny)
    N = torch.diag(s)
    # each factor as one product in its final layout (no transposed copies)
    if tall:  # W = wide^T ~ (sketch u / s) diag(s) (basis u)^T
        B, A = (sketch @ u) * inv_s, u.T @ (block if basis is landmark_vectors else basis.T)
    else:
        B, A = basis @ u, (u.T * inv_s.unsqueeze(1)) @ sketch.T
    return Factors(
        A=A.contiguous(), N=(N / scaling).contiguous(), B=B.contiguous(), rows=picked if tall else None,
        cols=None if tall else picked, captured_energy=s[:r].pow(2).sum().item(), weight_norm_sq=norm_sq,
        weight_row_norms=norms if tall else None,
    )  # fmt: skip


def reference_factors(weight: torch.Tensor, r: int) -> Factors:
    """The authors' release, bit for bit: ``A = W[:r, :]``, ``N = W[:r, :r]``, ``B = W[:, :r]``."""
    w = weight.detach()
    return Factors(A=w[:r, :].clone(), N=w[:r, :r].clone(), B=w[:, :r].clone())


def kaiming_(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's LoRA default init (Kaiming-uniform with a = sqrt(5)), drawn from ``generator``."""
    return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def slora_factors(out_features: int, in_features: int, r: int, generator: torch.Generator | None = None) -> Factors:
    """The reference SLoRA init: A and N Kaiming-uniform, B = 0, so ``delta_W = 0`` at step 0."""
    A = kaiming_(torch.empty(r, in_features), generator)
    N = kaiming_(torch.empty(r, r), generator)
    return Factors(A=A, N=N, B=torch.zeros(out_features, r))


def delta_weight(factors: Factors, scaling: float) -> torch.Tensor:
    """``scaling * B @ N @ A`` in fp32."""
    return scaling * (factors.B.float() @ (factors.N.float() @ factors.A.float()))


def relative_error(weight: torch.Tensor, factors: Factors, scaling: float) -> float:
    """``||W - s B N A||_F / ||W||_F``."""
    w = weight.detach().float()
    return (torch.linalg.matrix_norm(w - delta_weight(factors, scaling)) / torch.linalg.matrix_norm(w)).item()


def svd_optimal_error(weight: torch.Tensor, r: int) -> float:
    """The Eckart-Young optimum: relative Frobenius error of the best rank-r approximation."""
    s = torch.linalg.svdvals(weight.detach().float())
    return (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt().item()


def _position_weights(n: int, device: torch.device, a: float = 0.7, b: float = 0.3) -> torch.Tensor:
    return torch.cos(torch.arange(n, dtype=torch.float32, device=device) * a + b)


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """A tolerance-friendly checksum of a (small) tensor: its norm and a position-weighted sum.

    Factors re-derived on another machine or from a bf16 copy of W differ in the last bits, so a byte hash would
    be too strict; these two numbers still catch a different rank, landmark set, sign or permutation.
    """
    t = tensor.detach().float()
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    # separable position weights u_i v_j: one matrix-vector product, no temporary the size of t
    u, v = _position_weights(t.shape[0], t.device), _position_weights(t.shape[1], t.device, 1.3, 0.1)
    return [torch.linalg.vector_norm(t).item(), (u @ (t @ v)).item()]


def weight_fingerprint(weight: torch.Tensor, norms: torch.Tensor | None = None) -> list[float]:
    """The base weight's checksum: ``||W||`` and a position-weighted sum of its squared row norms over ``||W||``.

    Row norms cost a third of the matrix-vector product :func:`fingerprint` needs (and nothing when the norm
    landmarks of a tall W computed them: ``norms``); they catch a different, scaled or row-permuted weight and miss
    only a column permutation or a sign flip of W, which no mix-up of real checkpoints produces.
    """
    norms_sq = (row_norms(weight.detach()) if norms is None else norms).pow(2)
    total = norms_sq.sum().sqrt().item()
    return [total, (_position_weights(norms_sq.shape[0], norms_sq.device) @ norms_sq).item() / max(total, 1e-30)]


def init_fingerprint(weight: torch.Tensor, factors: Factors, eps: float | None = None) -> list[float]:
    """What identifies a Nyström init: the fingerprint of W (its norm catches a scaled W, which leaves orthonormal
    A and B unchanged), the precision of W (``eps``, default the machine epsilon of its dtype), then the
    fingerprints of the initial A, N and B."""
    eps = torch.finfo(weight.dtype).eps if eps is None else eps
    return [*weight_fingerprint(weight, factors.weight_row_norms), eps,
            *fingerprint(factors.A), *fingerprint(factors.N), *fingerprint(factors.B)]  # fmt: skip


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    scale = max(abs(a[0]), abs(b[0]), 1e-12)  # (norm, weighted sum) pairs, relative to the norm
    return all(abs(x - y) <= rtol * scale for x, y in zip(a, b))


def same_base(a: list[float], b: list[float]) -> bool:
    """Whether two fingerprints (:func:`init_fingerprint`, or its first three numbers: W's checksum and precision)
    come from the same W, up to the coarser of the two precisions."""
    return min(len(a), len(b)) >= 3 and _close(a[:2], b[:2], 1e-5 + 2 * max(a[2], b[2]))


def same_factors(a: list[float], b: list[float]) -> bool:
    """Whether the initial factors agree (up to rounding of the coarser dtype): a bf16 copy of W can rotate A and
    B where singular values nearly coincide, and then an N trained on the other factors does not fit them."""
    rtol = 1e-4 + 4 * max(a[2], b[2])
    return len(a) == len(b) == 9 and all(_close(a[i : i + 2], b[i : i + 2], rtol) for i in (3, 5, 7))
