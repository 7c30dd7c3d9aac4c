"""Thin layers over :mod:`singan_insert.insertion` for the frameworks people train with.

- :mod:`.torchio`: ``TumorInsertion`` and ``RandomTumorInsertion`` (TorchIO transforms).
- :mod:`.monai`: ``TumorInsertiond`` and ``RandTumorInsertiond`` (MONAI dictionary transforms;
  extra ``monai``).
- :mod:`.nnunet`: ``nnUNetTrainerTumorInsertion``, tumors inserted on the fly in nnU-Net v2
  training (extra ``nnunet``).

Each module imports its framework, so import the one you use.
"""
