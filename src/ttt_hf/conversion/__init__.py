"""Converters from the official TTT checkpoints to ttt_hf checkpoint folders."""

from .ttt_jax import convert_ttt_jax
from .ttt_pytorch import convert_ttt_pytorch

__all__ = ["convert_ttt_jax", "convert_ttt_pytorch"]
