"""Packaging: the pure-Python package, with kernels/ and bench/ installed as d2v.kernels and d2v.bench."""
from setuptools import setup

setup(
    packages=["d2v", "d2v.ops", "d2v.models", "d2v.data", "d2v.kernels", "d2v.bench"],
    package_dir={"d2v.kernels": "kernels", "d2v.bench": "bench"},
)
