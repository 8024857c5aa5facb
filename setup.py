"""setuptools shim: everything lives in pyproject.toml except the cffi extension,
which setuptools can only take through setup()'s ``cffi_modules`` keyword."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
