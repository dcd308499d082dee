"""The error types: one per kind of failure, each message saying what to do next."""


class SdliteError(Exception):
    """Base class of every error sdlite raises on purpose."""


class CheckpointError(SdliteError):
    """A checkpoint file cannot be used: missing, unsafe, corrupt, not Stable Diffusion,
    or its keys/shapes do not match the network. The message names the file."""


class SamplerError(SdliteError, ValueError):
    """An unknown sampler or schedule name; the message lists the valid ones."""


class ArgumentError(SdliteError, ValueError):
    """A generation argument is out of range (size not divisible by 8, steps < 1, ...)."""


class GenerationError(SdliteError, RuntimeError):
    """Sampling produced an unusable result, e.g. NaN in the image even after the fp32 retry."""
