"""Intracranial hemorrhage detection on head CT: the shared library.

Data flows one way: DICOM -> HU slice -> windowed tensor -> STN -> backbone -> heads -> probabilities
-> run records -> dashboard. Nothing in here imports ``training`` or ``app``.
"""

__version__ = "0.1.0"
