"""The test photos as the server tests upload them."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from helpers import photo


@pytest.fixture(scope="session")
def chelsea() -> bytes:
    return photo("chelsea.png").read_bytes()


@pytest.fixture(scope="session")
def small(chelsea) -> bytes:
    """A 128x96 PNG crop of chelsea.png (the cat's face)."""
    with Image.open(io.BytesIO(chelsea)) as im:
        buf = io.BytesIO()
        im.convert("RGB").crop((150, 40, 278, 136)).save(buf, "PNG")
        return buf.getvalue()
