"""Accuracy evaluation: metrics, scoring of reconstructions, the SIFT baseline."""
