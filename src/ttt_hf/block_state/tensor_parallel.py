"""Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the styles the Block-State layers need beside
transformers' own, and the collective for the replicated tensors that head-sharded code reads.

Each rank holds whole heads: their self-attention projections, their cross-attention projections (per-head
weights for the multi-head context) and the matching columns of the output projection, whose input is the
self heads followed by the cross heads. The SSM is replicated: every rank computes the same context.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, RowwiseParallel, TensorParallelLayer


# Copied from ttt_hf.ttt.tensor_parallel.HeadShard
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


class GroupedRowwise(RowwiseParallel):
    """Row-wise for a linear layer whose input is k head groups side by side (self heads, then cross heads;
    k = in_features // out_features): each rank holds its slice of every group, which is how the column-wise
    projections before it leave the input. The partial outputs are summed over the ranks."""

    def __init__(self) -> None:
        super().__init__(input_layouts=Shard(-1), output_layouts=Replicate())

    def should_use_local_tensors(self, module: nn.Module) -> bool:
        return True

    def shard_param(self, module: nn.Module, param: str, mesh, *args, **kwargs) -> None:
        tensor = module._parameters.get(param)
        if tensor is None:
            return
        groups = max(1, module.in_features // module.out_features)
        if param == "bias":
            placement = Replicate()
        elif groups == 1:
            placement = Shard(tensor.ndim - 1)
        else:  # the rank's slice of each group, as transformers' packed styles place it (a private placement,
            # imported here so that the model loads without it)
            from torch.distributed.tensor.placement_types import _StridedShard

            placement = _StridedShard(dim=tensor.ndim - 1, split_factor=groups)
        sharded = distribute_tensor(tensor, mesh, [placement], src_data_rank=None)
        module._parameters[param] = nn.Parameter(sharded, requires_grad=tensor.requires_grad)

    def transform_output_post_forward(self, module: nn.Module, output: torch.Tensor, mesh, *args, **kwargs):
        output = DTensor.from_local(output, mesh, [Partial()], run_check=False).redistribute(placements=[Replicate()])
        output = output.to_local()
        if (bias := module._parameters.get("bias")) is not None:
            output = output + local(bias)
        return output


class ColwiseOrHeadShard(TensorParallelLayer):
    """transformers' `colwise` on an `nn.Linear`, `ttt_hf_head_shard` on anything else: the cross-attention
    key/value projections are linear layers for a single-head or multi-filter context and per-head weights
    (`HeadwiseLinear`) for a multi-head one."""

    def _style(self, module: nn.Module) -> TensorParallelLayer:
        return ALL_PARALLEL_STYLES["colwise" if isinstance(module, nn.Linear) else "ttt_hf_head_shard"]

    def validate_param(self, module: nn.Module, *args, **kwargs):
        return self._style(module).validate_param(module, *args, **kwargs)

    def shard_param(self, module: nn.Module, *args, **kwargs):
        return self._style(module).shard_param(module, *args, **kwargs)

    def install_forward(self, module: nn.Module, *args, **kwargs):
        return self._style(module).install_forward(module, *args, **kwargs)


ALL_PARALLEL_STYLES.register("ttt_hf_head_shard", HeadShard())
ALL_PARALLEL_STYLES.register("ttt_hf_grouped_rowwise", GroupedRowwise())
ALL_PARALLEL_STYLES.register("ttt_hf_colwise_or_head_shard", ColwiseOrHeadShard())


# Copied from ttt_hf.ttt.tensor_parallel.local
def local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's shard on this rank (differentiable), or the tensor itself without tensor parallelism."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# Copied from ttt_hf.ttt.tensor_parallel.has_sharded_parameters
def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether parameters are split over ranks (tensor parallelism, or FSDP outside a unit's forward)."""
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


# Copied from ttt_hf.ttt.tensor_parallel.tp_group
def tp_group(parameter: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group a parameter is sharded over, None without tensor parallelism."""
    return parameter.device_mesh.get_group() if isinstance(parameter, DTensor) else None


# Copied from ttt_hf.ttt.tensor_parallel.GradAllReduce
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


# Copied from ttt_hf.ttt.tensor_parallel.grad_all_reduce
def grad_all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return GradAllReduce.apply(x, group)
