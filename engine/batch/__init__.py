"""Many pictures at once: inputs, the manifest, local and Ray backends."""
