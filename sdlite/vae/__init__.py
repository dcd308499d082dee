"""The KL autoencoder (VAE) that maps images to the latent space of Stable Diffusion and back."""

from .model import AutoencoderKL, Decoder, DiagonalGaussian, Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussian", "Encoder", "Decoder"]
