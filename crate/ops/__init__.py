"""Operating the platform itself: the local Ray + MLflow stack's process supervisor (platform/stack calls it)."""
