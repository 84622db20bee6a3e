"""One thin CLI per DVC stage. ``pipeline`` is imported first so its numerics settings precede torch."""
import pipeline  # noqa: F401
