"""Dreams over time: clips, zooms, optical flow."""
