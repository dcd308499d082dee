"""sdlite: a from-scratch, readable latent diffusion library.

    >>> import sdlite
    >>> pipe = sdlite.load()                                   # the bundled model  # doctest: +SKIP
    >>> images = pipe.txt2img("a red circle on the left", seed=1)                    # doctest: +SKIP
    >>> from sdlite.infotext import save_png                                     # a PNG with A1111's settings text
    >>> save_png(images[0], "circle.png", images.infotexts[0])                   # doctest: +SKIP
    >>> pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")  # any original SD1/SD2 file  # doctest: +SKIP
"""

from .config import SD1, SD2, SD2_V, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .errors import ArgumentError, CheckpointError, GenerationError, SamplerError, SdliteError
from .pipeline import Images, Pipeline, load, save

__version__ = "0.1.0"

__all__ = [
    "load", "save", "Pipeline", "Images",
    "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "SD1", "SD2", "SD2_V",
    "SdliteError", "CheckpointError", "SamplerError", "ArgumentError", "GenerationError",
]
