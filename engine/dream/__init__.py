"""Gradient ascent on pictures: the ascent, normalisers, creative controls, class visualisation,
parameterisations, transforms, the atlas, one frame's dream."""
