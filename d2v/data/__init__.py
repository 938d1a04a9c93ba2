"""Datasets per modality."""
