"""ckpt: streaming, verified conversion of LLM checkpoints between Hugging Face and MaxText."""

__version__ = "0.1.0"
