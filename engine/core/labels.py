"""The 1000 ImageNet-1k class names, in class-index order.

``imagenet_labels.txt`` was generated once from torchvision's ``_IMAGENET_CATEGORIES`` (the names
torchvision's weights carry; duplicates such as the two "crane"s are already disambiguated), so
the runtime needs no torch.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["imagenet_labels"]


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:  # a packaging mistake, not a user error
        raise RuntimeError(f"imagenet_labels.txt has {len(names)} names, expected 1000")
    return names


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names; index i is class i."""
    return list(_labels())
