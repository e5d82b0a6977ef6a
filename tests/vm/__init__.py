"""Integration tests that run inside a guest with several NUMA nodes (``make vm-test``).

A package on purpose: its conftest then loads as ``vm.conftest``, so that
``from conftest import need, ...`` in these modules still names
tests/conftest.py, whose helpers and fixtures they reuse.
"""
