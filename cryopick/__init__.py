"""cryopick: positive-unlabeled cryo-EM particle picking (nnPU + Selective FixMatch)."""

__version__ = "0.1.0"
