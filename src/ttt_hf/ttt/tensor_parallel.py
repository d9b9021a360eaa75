"""Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the style that splits per-head parameters over
the ranks, and the collectives the layer's head-sharded code needs.

transformers' plans shard `nn.Linear` layers and wrap their inputs and outputs; a TTT layer also holds per-head
tensors (the inner model's initial state, its LayerNorm, the learning-rate gate, the q/k convolutions) that it
uses directly. Those are split on their first dimension (heads, or channels of heads) by `ttt_hf_head_shard`,
and the layer runs on their local shards: each rank computes its heads, as if the model had only those.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer


class HeadShard(TensorParallelLayer):
    """Splits every parameter of the module (or the parameter) it names on dim 0. No hooks: the module reads
    its local shards itself (`local`)."""

    def shard_param(self, module: nn.Module, param: str, mesh, *args, **kwargs) -> None:
        # transformers 5.17 calls shard_param(module, param, mesh); later releases add keyword arguments.
        tensor = module._parameters.get(param)
        if tensor is None:
            return
        if tensor.shape[0] % mesh.size():
            raise ValueError(
                f"tensor parallelism splits heads evenly: {type(module).__name__}.{param} has {tensor.shape[0]} "
                f"rows (heads or their channels) for {mesh.size()} ranks; num_attention_heads must be a multiple "
                "of the tensor-parallel size"
            )
        sharded = distribute_tensor(tensor, mesh, [Shard(0)], src_data_rank=None)
        module._parameters[param] = nn.Parameter(sharded, requires_grad=tensor.requires_grad)


ALL_PARALLEL_STYLES.register("ttt_hf_head_shard", HeadShard())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's shard on this rank (differentiable), or the tensor itself without tensor parallelism."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether parameters are split over ranks (tensor parallelism, or FSDP outside a unit's forward)."""
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def tp_group(parameter: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group a parameter is sharded over, None without tensor parallelism."""
    return parameter.device_mesh.get_group() if isinstance(parameter, DTensor) else None


class GradAllReduce(torch.autograd.Function):
    """Identity forward, gradient summed over the group backward: for a replicated tensor read by head-sharded
    math, whose gradient on each rank holds only that rank's heads' part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may hand the same gradient to others
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def grad_all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return GradAllReduce.apply(x, group)


class AllReduceSum(torch.autograd.Function):
    """A sum over the group that every rank then uses: the gradient is summed over the group too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sharded_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, width: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """LayerNorm over a last dimension of `width` split over the group: x, weight and bias are this rank's
    slices; the mean and variance are summed over the group (in fp32)."""
    xf = x.float()
    mean = AllReduceSum.apply(xf.sum(-1, keepdim=True), group) / width
    centered = xf - mean
    variance = AllReduceSum.apply(centered.square().sum(-1, keepdim=True), group) / width
    normed = centered * torch.rsqrt(variance + eps)
    return (normed * weight.float() + bias.float()).to(x.dtype)
