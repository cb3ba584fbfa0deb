"""Pictures and video in and out: reading, resizing, writing images with their provenance; decoding
and encoding video."""
