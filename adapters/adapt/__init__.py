"""WeSAM weakly supervised adaptation (see docs/adaptation.md and shared/docs/wesam-method.md)."""

METHODS = ("self-training", "anchor", "wesam", "wesam+", "oracle")
DEFAULT_METHOD = "wesam+"
# 3e-4 drifted after ~100 steps on Kvasir-SEG validation with sam-mini; 1e-4 kept rising to step 200.
DEFAULT_LR = 1e-4
