"""Tests of keras_mm.evaluation."""
