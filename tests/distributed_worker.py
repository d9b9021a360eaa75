"""Training under `Trainer` with a distributed engine, as a user runs it: one process of
`python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py ENGINE FAMILY OUT` (gloo on the
CPU), or the whole run in one process (engine "single") for the reference. Also imported by the tests.

A run trains `STEPS` optimizer steps of a global batch of `GLOBAL_BATCH` rows, saving a checkpoint after
`RESUME_AT` steps, then resumes from that checkpoint in a second `Trainer` and trains to the same step. The
first process writes OUT/trained.safetensors and OUT/resumed.safetensors (every parameter, gathered whole).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_state_testing  # noqa: E402
import ttt_testing  # noqa: E402
from integration_testing import FixedDataset  # noqa: E402

ENGINES = ("single", "ddp", "fsdp2")
STEPS = 3
RESUME_AT = 2
GLOBAL_BATCH = 4


def tiny_model(family: str):
    if family == "ttt":
        return ttt_testing.tiny_model("linear", "mamba", seed=0)
    return block_state_testing.tiny_model(seed=0, context_mode="mf")


def engine_arguments(engine: str, world_size: int) -> dict:
    """What a user passes to `TrainingArguments` for the engine, beside launching it."""
    if engine == "ddp":
        return dict(ddp_find_unused_parameters=False)  # every parameter takes part in every step
    if engine == "fsdp2":
        # Decoder layers are wrapped (sharded) one by one, found through the model's `_no_split_modules`.
        return dict(
            fsdp="full_shard auto_wrap",
            fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True},
        )
    return {}


def training_arguments(engine: str, out: Path, world_size: int, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        seed=0,
        # SGD with momentum: a parameter's error stays proportional to its gradient's (Adam's normalised step
        # would blow a gradient's rounding up to the full step where the gradient is tiny), and resuming
        # needs the optimizer's state (momentum) and the scheduler's (a decaying rate).
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.05,
        lr_scheduler_type="linear",
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        train_sampling_strategy="sequential",
        average_tokens_across_devices=True,
        logging_strategy="no",
        save_strategy="steps",
        save_steps=RESUME_AT,
        save_only_model=False,
        disable_tqdm=True,
        ddp_timeout=120,
        **engine_arguments(engine, world_size),
    )
    values.update(overrides)
    return TrainingArguments(**values)


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, whole (an FSDP2 shard is gathered), under the unwrapped model's names."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    return {name: tensor.detach().float().cpu().clone() for name, tensor in state.items()}


def run(engine: str, family: str, out: Path, gradient_checkpointing: bool = False) -> dict[str, dict]:
    """Trains, resumes, and returns {"trained": parameters, "resumed": parameters} (in every process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    for name, max_steps, resume in (("trained", STEPS, None), ("resumed", STEPS, out / f"checkpoint-{RESUME_AT}")):
        args = training_arguments(
            engine,
            out,
            world_size,
            max_steps=max_steps,
            gradient_checkpointing=gradient_checkpointing,
            save_strategy="steps" if resume is None else "no",
        )
        trainer = Trainer(model=tiny_model(family), args=args, train_dataset=FixedDataset())
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        assert trainer.state.global_step == STEPS
        results[name] = full_parameters(trainer)
        trainer.accelerator.wait_for_everyone()
    return results


def main() -> None:
    engine, family, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    gradient_checkpointing = "--gradient-checkpointing" in sys.argv[4:]
    results = run(engine, family, out, gradient_checkpointing)
    if int(os.environ.get("RANK", "0")) == 0:
        for name, parameters in results.items():
            save_file(parameters, str(out / f"{name}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
