"""WeSAM weakly supervised adaptation (see docs/adaptation.md and shared/docs/wesam-method.md)."""

METHODS = ("self-training", "anchor", "wesam", "wesam+", "oracle")
DEFAULT_METHOD = "wesam+"
