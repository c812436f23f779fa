"""megaclone: Megatron-style TP/PP pretraining on DeepSpeed, with HyperCloning of sharded checkpoints."""

__version__ = "0.1.0"
