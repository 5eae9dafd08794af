"""Prompt templates: a class name is embedded in each template, and the normalised embeddings are averaged."""
from __future__ import annotations

from typing import Sequence

#: Our default ensemble (the shipped model was trained with exactly these).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "there is a {} in the scene.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bad photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "this is a {}.",
    "{}",
)

#: A 32-template ensemble in the spirit of the paper's (CLIP-style phrasings, our own wording).
PAPER_TEMPLATES: tuple[str, ...] = (
    "a bad photo of the {}.", "a photo of many {}.", "a sculpture of the {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of the {}.", "graffiti of the {}.", "a cropped photo of the {}.",
    "a tattoo of the {}.", "the embroidered {}.", "a bright photo of the {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of the {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of the {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a pixelated photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendition of the {}.",
    "a photo of the large {}.", "a photo of the small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.",
)


def resolve_templates(t: str | Sequence[str] | None) -> list[str]:
    """A template choice -> the list of templates, each with one ``{}`` where the class name goes.

    ``"default"`` -> ``DEFAULT_TEMPLATES``; ``"paper"`` -> ``PAPER_TEMPLATES``; ``"none"`` or ``None`` -> the bare
    name (``["{}"]``); one string containing ``{}`` -> that single template; a sequence of such strings -> itself.
    Anything else raises ``ValueError`` saying what to give instead.
    """
    if t is None:
        return ["{}"]
    if isinstance(t, str):
        key = t.strip().lower()
        if key == "none":
            return ["{}"]
        if key == "default":
            return list(DEFAULT_TEMPLATES)
        if key == "paper":
            return list(PAPER_TEMPLATES)
        if "{}" in t:
            t = [t]
        else:
            raise ValueError(f"unknown template set {t!r}; use 'default', 'paper', 'none', "
                             f"or templates with '{{}}' where the class name goes, e.g. ['a photo of a {{}}.']")
    try:
        out = list(t)
    except TypeError:
        raise ValueError(f"templates must be 'default', 'paper', 'none', None or a list of strings, "
                         f"got {type(t).__name__}") from None
    if not out:
        raise ValueError("the template list is empty; give at least one template such as 'a photo of a {}.'")
    for s in out:
        if not isinstance(s, str):
            raise ValueError(f"every template must be a string, got {s!r} ({type(s).__name__})")
        if s.count("{}") != 1:
            raise ValueError(f"template {s!r} must contain '{{}}' exactly once, where the class name goes "
                             f"(e.g. 'a photo of a {{}}.')")
    return out
