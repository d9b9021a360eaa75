"""Converters from the official TTT checkpoints to ttt_hf checkpoint folders."""

from .ttt_pytorch import convert_ttt_pytorch

__all__ = ["convert_ttt_pytorch"]
