"""Training under a distributed engine, as a user runs it: one process of
`python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py ENGINE FAMILY OUT` (gloo on the
CPU), or the whole run in one process for the reference. Also imported by the tests.

A run trains `STEPS` optimizer steps of a global batch of `GLOBAL_BATCH` rows, saving a checkpoint after
`RESUME_AT` steps, then resumes from that checkpoint with a fresh model and optimizer and trains to the same
step. The first process writes OUT/trained.safetensors and OUT/resumed.safetensors (every parameter, whole;
resumed only where the engine can resume on the CPU, see `trainer_resumes_several_cpu_processes`).

Engines: "ddp" and "single" run `Trainer`. accelerate runs FSDP on GPUs only, so "fsdp2" and "fsdp2-single"
apply FSDP2 as accelerate does (`fully_shard` on every module class of `_no_split_modules`, then on the root) in
a plain loop, with a sharded checkpoint (torch.distributed.checkpoint), with and without the sharding. "tp" and
"tp-single" load OUT/model with and without transformers' tensor parallelism and run the same loop, save the
trained model with `save_pretrained` (OUT/saved) and write the logits and greedy tokens of a padded batch
(OUT/inference.safetensors).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    CompileConfig,
    DistributedConfig,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_state_testing  # noqa: E402
import ttt_testing  # noqa: E402
from integration_testing import FixedDataset  # noqa: E402

STEPS = 3
RESUME_AT = 2
GLOBAL_BATCH = 4
LEARNING_RATE = 0.05
# SGD with momentum: a parameter's error stays proportional to its gradient's (Adam's normalised step would blow
# a gradient's rounding up to a full step where the gradient is tiny), and resuming needs the optimizer's state
# (momentum) and the scheduler's (a linearly decaying rate).
MOMENTUM = 0.9


def tiny_model(family: str, gradient_checkpointing: bool = False):
    """family: "ttt" (TTT-Linear, Mamba backbone), "ttt-LAYER-BACKBONE" or "block_state-MODE[-previous]" (MODE: sh,
    mh or mf)."""
    if family == "ttt":
        model = ttt_testing.tiny_model("linear", "mamba", seed=0)
    elif family.startswith("ttt-"):
        model = ttt_testing.tiny_model(*family.split("-")[1:], seed=0)
    else:  # "-previous": self-attention also sees the previous block
        mode = family.removeprefix("block_state-").removesuffix("-previous")
        model = block_state_testing.tiny_model(
            seed=0, context_mode=mode, attend_previous_block=family.endswith("-previous")
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a launcher."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def trainer_resumes_several_cpu_processes() -> bool:
    """Before 5.25, `Trainer` resuming several processes on the CPU loads the optimizer to `cpu:0`, which torch
    cannot restore (on GPUs it loads to `cuda:N`)."""
    return Version(transformers.__version__) >= Version("5.25")


def trainer_run(engine: str, family: str, out: Path, gradient_checkpointing: bool) -> dict[str, dict]:
    """`Trainer`, in one process or under DDP (which needs nothing beyond the launcher)."""
    _, world_size = world()
    results = {}
    runs = (("trained", None), ("resumed", out / f"checkpoint-{RESUME_AT}"))
    for name, resume in runs if world_size == 1 or trainer_resumes_several_cpu_processes() else runs[:1]:
        args = TrainingArguments(
            output_dir=str(out),
            report_to=[],
            use_cpu=True,
            seed=0,
            optim="sgd",
            optim_args=f"momentum={MOMENTUM}",
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear",
            max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            train_sampling_strategy="sequential",
            average_tokens_across_devices=True,
            logging_strategy="no",
            save_strategy="steps" if resume is None else "no",
            save_steps=RESUME_AT,
            disable_tqdm=True,
            ddp_timeout=120,
            ddp_find_unused_parameters=False,  # every parameter takes part in every step
        )
        trainer = Trainer(model=tiny_model(family, gradient_checkpointing), args=args, train_dataset=FixedDataset())
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        assert trainer.state.global_step == STEPS
        state = trainer.accelerator.get_state_dict(trainer.model)
        results[name] = {key: tensor.detach().float().cpu().clone() for key, tensor in state.items()}
        trainer.accelerator.wait_for_everyone()
    return results


def shard_like_accelerate(model, bf16: bool) -> None:
    """FSDP2 as accelerate's plugin applies it with transformer-based wrapping (each decoder layer is a unit) and,
    for `mixed_precision="bf16"`, bf16 compute over fp32 parameters with fp32 gradient reduction."""
    mesh = init_device_mesh("cpu", (world()[1],))
    options = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, **options)
    fully_shard(model, **options)


class Loop:
    """A model, its optimizer and its schedule, trained on the global batch's loss (the mean over its target
    tokens, as `Trainer` takes it): with data parallelism each rank computes its share of the rows, with tensor
    parallelism every rank computes all of them."""

    def __init__(self, model, data_parallel: bool) -> None:
        self.model = model
        self.data_parallel = data_parallel
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1 - step / STEPS)
        self.data = FixedDataset()

    def step(self, step: int) -> None:
        rank, world_size = world()
        rows = (step * GLOBAL_BATCH + torch.arange(GLOBAL_BATCH)) % len(self.data)
        labels = self.data.labels[rows]
        num_items_in_batch = (labels[:, 1:] != -100).sum()
        mine = rows.chunk(world_size)[rank] if self.data_parallel else rows
        loss = self.model(
            input_ids=self.data.input_ids[mine], labels=self.data.labels[mine], num_items_in_batch=num_items_in_batch
        ).loss
        if self.data_parallel:
            loss = loss * world_size  # FSDP averages the ranks' gradients; the loss is already a global mean
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def state(self, options: StateDictOptions | None = None) -> dict:
        model, optimizer = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model, "optimizer": optimizer}

    def save(self, folder: Path) -> None:
        """FSDP2: each rank writes its shards (torch.distributed.checkpoint). Tensor parallelism: the whole state,
        gathered (the checkpoint planner rejects the strided shards of Block-State's output projection)."""
        if self.data_parallel:
            dcp.save(self.state(), checkpoint_id=folder)
        whole = None if self.data_parallel else self.state(StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world()[0] == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"scheduler": self.scheduler.state_dict(), "whole": whole}, folder / "loop.pt")

    def load(self, folder: Path) -> None:
        saved = torch.load(folder / "loop.pt", weights_only=False)
        if self.data_parallel:
            state, options = self.state(), None
            dcp.load(state, checkpoint_id=folder)
        else:
            state, options = saved["whole"], StateDictOptions(full_state_dict=True)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
        self.scheduler.load_state_dict(saved["scheduler"])

    def full_parameters(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            key: tensor.float().clone() for key, tensor in get_model_state_dict(self.model, options=options).items()
        }


def loop_run(make_model, out: Path, data_parallel: bool) -> tuple[dict[str, dict], nn.Module]:
    """The parameters trained and resumed, and the trained model."""
    checkpoint = out / f"checkpoint-{RESUME_AT}"
    loop = Loop(make_model(), data_parallel)
    for step in range(STEPS):
        if step == RESUME_AT:
            loop.save(checkpoint)
        loop.step(step)
    resumed = Loop(make_model(), data_parallel)
    resumed.load(checkpoint)
    for step in range(RESUME_AT, STEPS):
        resumed.step(step)
    return {"trained": loop.full_parameters(), "resumed": resumed.full_parameters()}, loop.model


def fsdp2_run(family: str, out: Path, shard: bool, gradient_checkpointing: bool, bf16: bool) -> dict[str, dict]:
    def make_model():
        model = tiny_model(family, gradient_checkpointing)
        if shard:
            shard_like_accelerate(model, bf16)
        return model

    return loop_run(make_model, out, data_parallel=True)[0]


def inference(model) -> dict[str, torch.Tensor]:
    """Logits of a left-padded batch and greedy tokens from it."""
    ids = FixedDataset().input_ids[:3]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    model.eval()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    return {"logits": logits, "generated": generated}


def check_split_model_decodes_eagerly(model) -> None:
    """With its parameters split over ranks a model keeps its decoding step out of `generate`'s compilation
    (asked for here on the CPU too)."""
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    ids = FixedDataset().input_ids[:2]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, compile_config=config)
    assert not hasattr(model, "_compiled_call")


def tp_run(out: Path, shard: bool, gradient_checkpointing: bool) -> dict[str, dict]:
    """The model saved in OUT/model, loaded with transformers' tensor parallelism (`tp_plan="auto"`) or whole."""

    def load():
        tp = {"distributed_config": DistributedConfig(tp_plan="auto")} if shard else {}
        model = AutoModelForCausalLM.from_pretrained(out / "model", **tp)
        if shard:  # the plan applied: projections split over the ranks
            assert isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    results, trained = loop_run(load, out, data_parallel=False)
    trained.save_pretrained(out / "saved")  # every rank takes part: the shards are gathered
    model = load()
    if shard:
        check_split_model_decodes_eagerly(model)
    return {"inference": inference(model), **results}


def run(
    engine: str, family: str, out: Path, gradient_checkpointing: bool = False, bf16: bool = False
) -> dict[str, dict]:
    """Trains, resumes, and returns {"trained": parameters, "resumed": parameters} (with tensor parallelism also
    "inference": logits and generated tokens)."""
    if engine in ("single", "ddp"):
        return trainer_run(engine, family, out, gradient_checkpointing)
    if engine.startswith("tp"):
        return tp_run(out, shard=engine == "tp", gradient_checkpointing=gradient_checkpointing)
    return fsdp2_run(family, out, engine == "fsdp2", gradient_checkpointing, bf16)


def main() -> None:
    engine, family, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    gradient_checkpointing = "--gradient-checkpointing" in sys.argv[4:]
    bf16 = "--bf16" in sys.argv[4:]
    if engine == "fsdp2":  # (transformers starts the process group for tensor parallelism)
        torch.distributed.init_process_group("gloo")
    results = run(engine, family, out, gradient_checkpointing, bf16)
    if world()[0] == 0:
        for name, parameters in results.items():
            save_file(parameters, str(out / f"{name}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's work is done, the first rank's files written
        # Leave without tearing down: a gloo process group's threads can abort a process in the interpreter's
        # teardown ("terminate called without an active exception", seen on a loaded 2-core machine), and nothing
        # is left to release.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
