"""One interface for visual tokenizers: ``tokenize(images) -> token ids``, the targets of masked image modelling.

A masked-image-modelling model predicts, for each masked patch, the id a tokenizer gives that patch (Bao et al. 2021,
"BEiT", arXiv:2106.08254, Sec. 2.2: the DALL-E dVAE's ids of a 112 px view for a 224 px, patch-16 model, one id per
patch). The tokenizer's grid must therefore equal the model's patch grid: ``grid(image_hw)`` says which grid an input
size gives, so a caller can pick the tokenizer's view size (or downsampling factor) to match.

Input convention (decided here, for every tokenizer): ``tokenize`` takes **raw RGB in [0, 1]**, ``(B, 3, H, W)``
float, *not* the classifier's mean/std normalisation. Tokenizers each have their own input mapping (the dVAE's
``map_pixels``, a VQ-VAE's centring), and a MIM pipeline feeds them a separate view of the image anyway (BEiT: the
112 px second view, ``ToTensor`` then ``map_pixels``; microsoft/unilm beit/datasets.py@03380c8
``DataAugmentationForBEiT``), so each tokenizer applies its own ``preprocess`` inside ``tokenize``. Images well
outside [0, 1] (e.g. already normalised) are refused rather than silently tokenized; a small overshoot (bicubic
resizing) is tolerated.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["VisualTokenizer", "check_images"]

# Raw [0, 1] images resized with overshooting kernels (bicubic, Lanczos) leave [0, 1] by a little; normalised images
# leave it by far (ImageNet statistics map black to -2.1).
RANGE_SLACK = 0.05


def check_images(images: Tensor) -> None:
    """Refuse anything but a float ``(B, 3, H, W)`` batch of raw RGB in [0, 1] (up to ``RANGE_SLACK``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"tokenize takes images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"tokenize takes float images in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if images.numel() == 0:
        return
    low, high = images.min().item(), images.max().item()
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ValueError(f"tokenize takes raw RGB in [0, 1], got values in [{low:.3g}, {high:.3g}]: pass the images "
                         f"before any mean/std normalisation (each tokenizer maps pixels itself)")


class VisualTokenizer(nn.Module):
    """Maps images to a grid of discrete ids in ``[0, vocab_size)``, one id per ``downsample`` x ``downsample``
    pixels. Subclasses set ``vocab_size`` and ``downsample`` and implement ``preprocess`` (raw [0, 1] pixels to the
    encoder's input) and ``ids_from_input`` (that input to ids)."""

    vocab_size: int
    downsample: int

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` token grid of an ``image_hw`` input; both sides must be multiples of ``downsample``."""
        h, w = (int(s) for s in image_hw)
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's downsampling factor "
                             f"{self.downsample}")
        return h // self.downsample, w // self.downsample

    def preprocess(self, images: Tensor) -> Tensor:
        """Raw RGB in [0, 1], ``(B, 3, H, W)``, to what the encoder takes."""
        raise NotImplementedError

    def ids_from_input(self, x: Tensor) -> Tensor:
        """Preprocessed images ``(B, C, H, W)`` to ids ``(B, h, w)``."""
        raise NotImplementedError

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """Raw RGB in [0, 1], ``(B, 3, H, W)`` float, to token ids: a ``LongTensor`` ``(B, h, w)`` with
        ``(h, w) = grid((H, W))``. Runs without autograd and does not change the module's state."""
        check_images(images)
        h, w = self.grid(images.shape[-2:])
        ids = self.ids_from_input(self.preprocess(images))
        if ids.shape != (images.shape[0], h, w):
            raise RuntimeError(f"{type(self).__name__} returned ids of shape {tuple(ids.shape)}, expected "
                               f"{(images.shape[0], h, w)}")
        return ids.long()
