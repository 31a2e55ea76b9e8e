"""Processes and files: workers that die with their owner (``parallel``), atomic writes
(``fileio``), the process group (``distributed``) and lazy package exports (``exports``).

The room above the floor: it imports nothing of maskdist but ``errors``.
"""
