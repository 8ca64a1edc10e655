"""WeSAM weakly supervised adaptation (see docs/adaptation.md and shared/docs/wesam-method.md)."""

METHODS = ("self-training", "anchor", "wesam", "wesam+", "oracle")
# Best mean validation gain over Kvasir-SEG and CVC-ClinicDB with box prompts (bench/RESULTS.md,
# "Adaptation"): wesam +0.0223, self-training +0.0220, wesam+ +0.0216, anchor +0.0200: a near tie.
DEFAULT_METHOD = "wesam"
# 3e-4 drifted after ~100 steps on Kvasir-SEG validation with sam-mini; 1e-4 kept rising to step 200.
DEFAULT_LR = 1e-4
