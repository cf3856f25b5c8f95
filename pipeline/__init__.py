"""Shared core: configuration, artifact store, camera formats, synthetic scenes, logging."""
