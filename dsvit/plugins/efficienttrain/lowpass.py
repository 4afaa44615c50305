"""Reducing a batch to a stage's input size: EfficientTrain's low-frequency crop and ET++'s resize.

EfficientTrain (Wang et al., ICCV 2023, arXiv:2211.09703) feeds early epochs only the low spatial
frequencies of each image: the centre B x B of its 2-D spectrum, transformed back, which is a
genuine B x B image (fewer tokens for a ViT). In an unshifted spectrum the kept signed frequencies
{-B/2, ..., B/2 - 1} on each axis are the four B/2 x B/2 corner blocks, so a gather of those rows and
columns in the order (0 .. B/2-1, N-B/2 .. N-1) is already the layout an inverse DFT of size B
expects: no fftshift. The (B/N)^2 factor keeps the DC level (a constant image stays that constant,
channel means are kept), and the real part drops what the lone -B/2 Nyquist bin leaves imaginary
(a cosine at exactly B/2 comes out at half amplitude, a sine vanishes). The operator is linear and
constant-preserving, so it commutes with per-channel normalisation; it treats the image as
periodic and samples it on a corner-aligned grid (sample m sits at input pixel m N/B).

EfficientTrain++ (Wang et al., TPAMI 2024, arXiv:2405.08768) replaced the FFT by a Lanczos resize on
the CPU after RandAugment. Here the default is an antialiased bicubic resize on the device, the
closest filter ``torch.nn.functional.interpolate`` offers (a tapered windowed kernel, half-pixel
centred, borders clamped rather than wrapped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("bicubic", "fft")


def _corners(n: int, half: int, device) -> torch.Tensor:
    """Indices of the signed frequencies -half .. half-1 of an n-point DFT, in DFT order."""
    return torch.cat([torch.arange(half, device=device), torch.arange(n - half, n, device=device)])


@torch.no_grad()
def lowpass_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """ET's low-frequency crop of ``x`` [..., H, W] to [..., side, side]: FFT, the corner gather of
    the kept bins, (side^2 / (H W)) scaling, inverse FFT of size ``side``, real part. Computed in at
    least fp32 (half-precision FFTs need power-of-two sizes), outside autocast, without gradient."""
    if side % 2:
        raise ValueError(f"the low-frequency crop needs an even size, got {side} (the released code "
                         f"silently returns {side - 1})")
    h, w = x.shape[-2:]
    if not 0 < side <= min(h, w):
        raise ValueError(f"crop size {side} must be in [2, {min(h, w)}] for a {h}x{w} input")
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        spec = torch.fft.fft2(x.to(dtype))
        half = side // 2
        spec = spec.index_select(-2, _corners(h, half, x.device))
        spec = spec.index_select(-1, _corners(w, half, x.device))
        return torch.fft.ifft2(spec * (side * side / (h * w))).real


@torch.no_grad()
def reduce_batch(images: torch.Tensor, side: int, method: str = "bicubic") -> torch.Tensor:
    """``images`` [B, C, H, W] at ``side`` x ``side`` in their own dtype: ``bicubic`` (antialiased)
    or ``fft`` (``lowpass_crop``)."""
    if method == "fft":
        return lowpass_crop(images, side).to(images.dtype)
    if method != "bicubic":
        raise ValueError(f"unknown reduction '{method}'; use one of {METHODS}")
    return F.interpolate(images, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
