"""What a dream is asked to do and what it resolves to: DreamSettings, presets, the resolver, the
memory budget, keyframe schedules, provenance."""
