"""The bounded job queue (no HTTP): its configuration, image, video and atlas jobs."""
