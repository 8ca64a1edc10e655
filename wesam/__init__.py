"""wesam: adapt Segment-Anything to new domains with weak labels, and serve it."""

__version__ = "0.1.0"
