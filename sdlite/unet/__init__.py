"""The Stable Diffusion UNet (CompVis ``openaimodel.UNetModel`` layout)."""

from sdlite.unet.model import UNetModel

__all__ = ["UNetModel"]
