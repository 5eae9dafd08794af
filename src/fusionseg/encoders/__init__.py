"""Frozen image and text encoders behind one name registry (:mod:`.base`).

Importing the package imports every implementation, which registers its names (``@register_image_encoder`` /
``@register_text_encoder``); :mod:`.base` itself imports none of them. A new encoder module is added here.
"""
from . import base  # noqa: F401 - the registry first
from . import efficientnet_lite, hf_text, hf_vision  # noqa: F401 - register their names
