"""Datasets shipped with ion_d2 and helpers to prepare data for ION's segmentation regularizer."""
