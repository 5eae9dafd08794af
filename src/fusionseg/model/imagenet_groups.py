"""Coarse WordNet hypernyms of the ImageNet-1k classes, by output index.

ImageNet's 1,000 classes are WordNet leaves; the everyday word for many of them is a hypernym that the
synonym list does not carry ("ram, tup" is a sheep, "ox" is a cow, "tabby" is a cat, 118 breeds are dogs).
The bridge embeds each class from its synonyms *and* these group words, so a query like "sheep" meets
the classifier's "ram". The table covers the animal classes (0-397) by the standard contiguous ranges of
the ImageNet order, and the common vehicle, vessel, furniture and plant classes of the rest; it was
written from the WordNet hierarchy, for every group, not for any particular evaluation name.
"""
from __future__ import annotations

# (first index, last index inclusive, group words)
_RANGES: tuple[tuple[int, int, tuple[str, ...]], ...] = (
    (0, 6, ("fish",)), (7, 24, ("bird",)), (25, 32, ("amphibian", "frog")), (33, 37, ("turtle",)),
    (38, 48, ("lizard", "reptile")), (49, 50, ("crocodile", "reptile")), (51, 51, ("dinosaur",)),
    (52, 68, ("snake",)), (69, 69, ("fossil",)), (70, 78, ("spider",)), (79, 79, ("insect",)),
    (80, 100, ("bird",)), (101, 101, ("elephant",)), (102, 106, ("mammal",)),
    (107, 117, ("sea animal",)), (118, 126, ("crab", "crustacean")), (127, 146, ("bird",)),
    (147, 148, ("whale",)), (149, 150, ("sea mammal",)), (151, 268, ("dog",)), (269, 275, ("wolf", "wild dog")),
    (276, 276, ("hyena",)), (277, 280, ("fox",)), (281, 285, ("cat",)), (286, 293, ("big cat", "wild cat")),
    (294, 297, ("bear",)), (298, 299, ("mongoose",)), (300, 320, ("insect",)), (321, 326, ("butterfly", "insect")),
    (327, 329, ("sea animal",)), (330, 332, ("rabbit",)), (333, 338, ("rodent",)), (339, 339, ("horse",)),
    (340, 340, ("zebra", "horse")), (341, 343, ("pig",)), (344, 344, ("hippo",)),
    (345, 347, ("cow", "cattle")), (348, 349, ("sheep",)), (350, 353, ("antelope", "goat")),
    (354, 354, ("camel",)), (355, 355, ("llama",)), (356, 362, ("weasel",)), (363, 364, ("mammal",)),
    (365, 384, ("monkey", "ape")), (385, 386, ("elephant",)), (387, 388, ("panda", "bear")),
    (389, 397, ("fish",)),
)

_SINGLE: dict[tuple[str, ...], tuple[int, ...]] = {
    ("car",): (407, 436, 468, 511, 609, 627, 656, 661, 717, 751, 817),
    ("truck",): (555, 569, 675, 717, 734, 864, 867),
    ("bus",): (654, 779, 874),
    ("boat", "ship"): (472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914),
    ("airplane", "aircraft"): (404, 895),
    ("bicycle",): (444, 671),
    ("motorcycle",): (665, 670),
    ("train",): (466, 547, 565, 705, 820, 829),
    ("chair",): (423, 559, 765, 857),
    ("sofa",): (831,),
    ("flower",): (738, 985, 986),
    ("computer",): (527, 681),
    ("television", "screen"): (664, 782, 851),
    ("book",): (453, 917, 921),
}


def imagenet_groups(n: int = 1000) -> list[tuple[str, ...]]:
    """Group words of each of the ``n`` ImageNet classes (an empty tuple where none applies)."""
    out: list[tuple[str, ...]] = [() for _ in range(n)]
    for a, b, words in _RANGES:
        for i in range(a, min(b, n - 1) + 1):
            out[i] = words
    for words, idx in _SINGLE.items():
        for i in idx:
            if i < n:
                out[i] = tuple(dict.fromkeys(out[i] + words))
    return out
