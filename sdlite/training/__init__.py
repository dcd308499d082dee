"""Training data and evaluation for the bundled sdlite model (no networks here).

- :mod:`sdlite.training.shapes`: a deterministic generator of captioned images of one coloured
  shape ("a red circle on the left"), with a held-out set of combinations;
- :mod:`sdlite.training.analysis`: reads colour, shape and position back from any RGB image by
  plain image analysis, and scores a text-to-image function's prompt adherence with it.
"""
