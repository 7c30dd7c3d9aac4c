"""Thin layers over :mod:`singan_insert.insertion` for the frameworks people train with.

- :mod:`.torchio`: ``TumorInsertion`` and ``RandomTumorInsertion`` (TorchIO transforms).

Each module imports its framework, so import the one you use.
"""
