"""The wesam version string; lives in the core so that every layer may read it."""

__version__ = "0.1.0"
