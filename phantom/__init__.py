"""Phantom room (`eyecare_edge.phantom`): synthetic fundus/OCT images with exact ground truth."""
