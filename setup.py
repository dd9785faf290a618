"""Shim for tools that still call setup.py (Beam's --setup_file); all metadata lives in setup.cfg."""
from setuptools import setup

setup()
