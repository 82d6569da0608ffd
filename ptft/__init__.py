"""ptft: pretrain -> finetune -> evaluate for PyTorch, one shell command per stage.

This package's top level imports nothing heavy: `ptft --help`, `ptft config` and
`ptft models` must answer without importing torch.
"""

__version__ = "0.1.0"
