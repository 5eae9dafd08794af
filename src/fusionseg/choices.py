"""Names and defaults the command line offers, in a module that imports nothing heavy: ``fusionseg --help`` and
argument errors answer without importing torch (2.7 s -> a fraction of a second on the 2-core test machine).
The modules that act on these names import them from here, so each is written once."""
from __future__ import annotations

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "minilm-l6"
#: Fusion-module sizes; their shapes are ``model.fusioner.PRESETS`` (a test keeps the two lists equal).
PRESET_NAMES = ("paper", "small", "tiny")
DEFAULT_PRESET = "small"
#: ``fusionseg evaluate --protocol``.
PROTOCOLS = ("semantic", "present", "episodes", "novel-names")
#: ``fusionseg evaluate --split``: every image, or only the images the model never trained on.
SPLITS = ("all", "val")
#: How names are scored (``Segmenter(mode=...)``, ``--mode``): the trained fusion model; the training-free
#: classifier bridge; or the fusion model for names near its training vocabulary and the bridge for the others.
#: ``auto`` (the default): fusion+bridge when the image encoder has a named classifier head, else fusion
#: (docs/RESULTS.md: fusion+bridge is the best design on unseen names and within 1.2 points on seen ones).
MODES = ("auto", "fusion", "bridge", "fusion+bridge")
#: How "none of these" is decided (``Segmenter(decision=...)``, ``--decision``): ``threshold``: a pixel keeps its
#: best name when that name's sigmoid score reaches the threshold; ``relative``: each name measured against its
#: own peak in the image (``tiling.relative_labels``).
DECISIONS = ("threshold", "relative")
