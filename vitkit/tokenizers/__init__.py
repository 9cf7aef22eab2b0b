"""Visual tokenizers behind one interface, ``tokenize(images) -> token ids``: the targets of masked image modelling.

- ``base``: ``VisualTokenizer`` (``vocab_size``, ``downsample``, ``grid(image_hw)``, ``tokenize``) and the input
  convention: raw RGB in [0, 1], each tokenizer maps pixels itself.
- ``dalle``: the DALL-E dVAE encoder (BEiT v1's tokenizer), its released ``encoder.pkl`` read by ``module_pickle``'s
  restricted unpickler without running any of its code.
- ``vq``: a VQ-VAE vitkit trains itself on unlabelled images (``train_vq``), saved as safetensors + config.json.
"""
from __future__ import annotations

from vitkit.tokenizers.base import VisualTokenizer, check_images
from vitkit.tokenizers.dalle import DalleConfig, DalleEncoder, map_pixels
from vitkit.tokenizers.vq import VQVAE, VQConfig, VQTraining, perplexity, train_vq

__all__ = ["VisualTokenizer", "check_images", "DalleConfig", "DalleEncoder", "map_pixels", "VQVAE", "VQConfig",
           "VQTraining", "perplexity", "train_vq"]
