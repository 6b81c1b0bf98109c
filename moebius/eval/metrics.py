"""Metric math: PSNR / SSIM (scikit-image), LPIPS (our VGG16 + LPIPS heads), FID (torchmetrics),
P-IDS / U-IDS (scikit-learn's linear SVM).

Per image pair on the whole image, uint8 RGB (H, W, 3): PSNR with data range 255 and SSIM as
scikit-image computes the Wang et al. definition with an 11x11 Gaussian window (sigma 1.5,
population covariances); LPIPS per pair. Over a set: FID (Frechet distance of pool3 features) and
P-IDS / U-IDS (CoModGAN's paired / unpaired inception discriminative scores).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """PSNR in dB of two uint8 images, data range 255 (inf when identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):  # identical images: inf, by definition
        return float(peak_signal_noise_ratio(gt, pred, data_range=255))


def ssim(gt: np.ndarray, pred: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images, averaged over pixels and channels."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255, channel_axis=-1)
    )  # fmt: skip


def to_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (1, 3, H, W)."""
    return torch.tensor(image).permute(2, 0, 1)[None].to(device)  # a copy: inputs may be read-only


@torch.inference_mode()
def lpips(model: nn.Module, gt: np.ndarray, pred: np.ndarray) -> float:
    """LPIPS of two uint8 (H, W, 3) images with a networks.LPIPS model (inputs to [-1, 1])."""
    device = next(model.parameters()).device
    a, b = (to_tensor(x, device).float() / 127.5 - 1 for x in (gt, pred))
    return float(model(a, b)[0])


@torch.inference_mode()
def inception_features(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> (2048,) float64 pool3 features."""
    device = next(model.parameters()).device
    return model(to_tensor(image, device))[0].double().cpu().numpy()


class _Given(nn.Module):
    """A 'feature extractor' that returns its input: torchmetrics then only does the statistics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two (N, D) feature sets (N >= 2): torchmetrics' float64 statistics and trace."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), reset_real_features=True)
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, np.float64)), real=False)
    return float(metric.compute())


def inception_discriminative_scores(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """P-IDS and U-IDS of paired (N, D) features: fake[i] is the fill of real[i].

    A linear SVM learns to tell real from fake features. U-IDS = its error rate on the two sets
    (0.5 = indistinguishable); P-IDS = share of pairs whose fake scores as more real than its own
    real image (0.5 = indistinguishable). Higher is better for both.
    """
    from sklearn.svm import LinearSVC

    if real.shape != fake.shape:
        raise ValueError(f"P-/U-IDS need paired features, got {real.shape} and {fake.shape}")
    inputs = np.concatenate([real, fake])
    targets = np.array([1] * len(real) + [0] * len(fake))
    svm = LinearSVC(dual=False).fit(inputs, targets)
    u_ids = 1 - svm.score(inputs, targets)
    p_ids = np.mean(svm.decision_function(fake) > svm.decision_function(real))
    return {"p_ids": float(p_ids), "u_ids": float(u_ids)}
