"""Sample-quality metrics computed from Inception activations alone (no network needed).

Formulas follow the ADM evaluator (openai/guided-diffusion), so numbers are comparable with
published ones: FID/sFID from mean and covariance statistics, the Inception Score from class
probabilities, and k-NN precision/recall (Kynkaanniemi et al. 2019) from pool features.
"""

import numpy as np
import torch
from scipy.special import rel_entr

DISTANCE_BLOCK = 4096  # rows/columns of one pairwise-distance block: bounds memory at any N


def compute_statistics(acts):
    """Mean and covariance (float64, `np.cov(rowvar=False)`) of an [N, D] activation array."""
    acts = np.asarray(acts, dtype=np.float64)
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


class RunningStatistics:
    """Mean and covariance accumulated batch by batch, for more activations than fit in memory."""

    def __init__(self):
        self.count = 0
        self.shift = None  # the first batch's mean: centring sums on it avoids cancellation
        self.sum = None
        self.outer = None

    def update(self, acts):
        """Adds an [n, D] batch of activations."""
        acts = np.asarray(acts, dtype=np.float64)
        if self.shift is None:
            self.shift = acts.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((acts.shape[1], acts.shape[1]))
        centred = acts - self.shift
        self.count += len(acts)
        self.sum += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def statistics(self):
        """(mu, sigma) of everything added so far: `compute_statistics` of all of it, to rounding."""
        if self.count < 2:
            raise ValueError("a covariance needs at least 2 activation vectors")
        mean_centred = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return self.shift + mean_centred, sigma


def _psd_sqrt(sigma):
    """Symmetric square root of a covariance matrix (eigenvalues below 0 are rounding: clipped)."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1, sigma2):
    """tr(sqrtm(sigma1 @ sigma2)) for covariance matrices, through symmetric eigendecompositions.

    sigma1 @ sigma2 is similar to R sigma2 R with R = sqrt(sigma1), which is symmetric positive
    semi-definite, so the trace is the sum of the square roots of its eigenvalues. This is the
    number ADM gets from scipy's sqrtm (to ~1e-14 relative when full rank), about 4x faster at
    2048 dimensions and real by construction, so sqrtm's regularisation retry and
    imaginary-part check have nothing to catch.
    """
    root = _psd_sqrt(sigma1)
    eigvals = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between two Gaussians: ||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def inception_score(probs, split_size=5000):
    """Mean over splits of exp(mean_i KL(p_i || mean p)) for [N, classes] class probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        kl = rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)  # p*log(p/q), 0 where p = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def default_device():
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(acts, device, half):
    """Activations on `device`: float32 (what ADM feeds its float16 path) or float64 (exact path)."""
    return torch.as_tensor(np.asarray(acts), device=device, dtype=torch.float32 if half else torch.float64)


def _round_half(x):
    """Rounds float32 values to the nearest float16 value, keeping float32 storage."""
    return x.half().float()


def pairwise_sq_distances(a, b, half=True):
    """Squared Euclidean distances between the rows of tensors a [n, D] and b [m, D].

    half=True reproduces ADM: ||a||^2 - 2ab + ||b||^2 with every step rounded to float16
    (clamped at 0), falling back to the exact float64 result where that overflows.
    half=False gives the exact float64 distances.
    """
    if half:
        a16, b16 = _round_half(a), _round_half(b)
        norm_a = _round_half((_round_half(a16 * a16)).sum(dim=1))
        norm_b = _round_half((_round_half(b16 * b16)).sum(dim=1))
        cross = _round_half(a16 @ b16.T)
        dist = _round_half(_round_half(norm_a[:, None] - 2 * cross) + norm_b[None, :]).clamp_min(0)
        if torch.isfinite(dist).all():
            return dist
    a, b = a.double(), b.double()
    norms = (a * a).sum(dim=1)[:, None] + (b * b).sum(dim=1)[None, :]
    return (norms - 2 * (a @ b.T)).clamp_min(0)


def _radii_tensor(feats, k, half, block):
    """Distance of each row of feats to its k-th nearest neighbour in feats (itself at 0)."""
    if len(feats) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} vectors, got {len(feats)}")
    radii = torch.empty(len(feats), dtype=torch.float64, device=feats.device)
    for r0 in range(0, len(feats), block):
        rows = feats[r0 : r0 + block]
        nearest = None  # the k+1 smallest distances of each row seen so far
        for c0 in range(0, len(feats), block):
            dist = pairwise_sq_distances(rows, feats[c0 : c0 + block], half).double()
            pool = dist if nearest is None else torch.cat([nearest, dist], dim=1)
            nearest = pool.topk(min(k + 1, pool.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block] = nearest[:, k]
    return radii


def manifold_radii(acts, k=3, half=True, device=None, block=DISTANCE_BLOCK):
    """k-NN radii (squared distance to the k-th nearest neighbour, self included) of [N, D] activations."""
    device = device or default_device()
    return _radii_tensor(_as_tensor(acts, device, half), k, half, block).cpu().numpy()


def precision_recall(ref_acts, sample_acts, k=3, half=True, device=None, block=DISTANCE_BLOCK):
    """(precision, recall): the fraction of samples inside some reference k-NN ball, and vice versa.

    Distances are computed block by block on `device` (the GPU when present), never as a full
    N x M matrix; half=True rounds them through float16 as the ADM evaluator does.
    """
    device = device or default_device()
    ref, sample = _as_tensor(ref_acts, device, half), _as_tensor(sample_acts, device, half)
    ref_radii, sample_radii = _radii_tensor(ref, k, half, block), _radii_tensor(sample, k, half, block)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for s0 in range(0, len(sample), block):
        for r0 in range(0, len(ref), block):
            dist = pairwise_sq_distances(sample[s0 : s0 + block], ref[r0 : r0 + block], half).double()
            sample_in[s0 : s0 + block] |= (dist <= ref_radii[None, r0 : r0 + block]).any(dim=1)
            ref_in[r0 : r0 + block] |= (dist <= sample_radii[s0 : s0 + block, None]).any(dim=0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
