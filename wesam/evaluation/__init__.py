"""Prompted evaluation: metrics and the evaluation loop with its box-filled baseline."""
