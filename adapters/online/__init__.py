"""Online self-training: the store of samples the service captures for the worker to train on.

``open_store(url)`` picks the backend (SQLite file or Redis); see docs/online.md.
"""

from .store import CapturedSample, InvalidSample, SampleStore, SampleStoreError, open_store, parse_store_url

__all__ = ["CapturedSample", "InvalidSample", "SampleStore", "SampleStoreError", "open_store", "parse_store_url"]
