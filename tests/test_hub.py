"""Publishing end to end against a fake Hub on 127.0.0.1 (tests/fake_hub.py): `push_to_hub` of a TTT and a
Block-State model and `upload_folder` of a converted official checkpoint, then a fresh process that cannot
import ttt_hf downloads them with trust_remote_code=True into an empty HF_HOME."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from block_state_testing import tiny_model as tiny_block_state
from fake_hub import FakeHub
from integration_testing import env_without_ttt_hf
from safetensors.torch import load_file
from ttt_testing import random_ids
from ttt_testing import tiny_model as tiny_ttt

import ttt_hf.block_state
import ttt_hf.ttt
from ttt_hf.conversion import convert_ttt_jax

JAX_FIXTURE = Path(__file__).parent / "fixtures" / "ttt_jax" / "ttt_mlp"
TAGS = ["ttt-hf", "test-time-training"]

_PUBLISH = textwrap.dedent(
    """
    import json
    import sys
    import ttt_hf  # noqa: F401  (registers the Auto classes, so the model code is uploaded)
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    plan = json.loads(sys.argv[1])
    for repo, folder in plan["push_to_hub"].items():
        AutoModelForCausalLM.from_pretrained(folder).push_to_hub(repo, commit_message="upload from ttt-hf tests",
                                                                  tags=plan["tags"])
    api = HfApi()
    for repo, folder in plan["upload_folder"].items():
        api.create_repo(repo)
        api.upload_folder(folder_path=folder, repo_id=repo)
    """
)

_DOWNLOAD = textwrap.dedent(
    """
    import sys
    sys.modules["ttt_hf"] = None  # the editable install's finder would import it otherwise
    import torch
    from transformers import AutoModelForCausalLM

    inputs = torch.load(sys.argv[1])
    results = {}
    for repo, ids in inputs.items():
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
        with torch.no_grad():
            results[repo] = {"logits": model(ids).logits, "class": type(model).__module__}
    results["ttt_hf_modules"] = [m for m in sys.modules if m.split(".")[0] == "ttt_hf" and sys.modules[m] is not None]
    torch.save(results, sys.argv[2])
    """
)


def _code_files(package) -> set[str]:
    """The model folder's modules: all of them must travel with the weights for trust_remote_code."""
    return {p.name for p in Path(package.__file__).parent.glob("*.py")} - {"__init__.py"}


_COMMON_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
EXPECTED_FILES = {
    "user/tiny-ttt": _COMMON_FILES | _code_files(ttt_hf.ttt),
    "user/tiny-block-state": _COMMON_FILES | _code_files(ttt_hf.block_state),
    "user/ttt-mlp-converted": _COMMON_FILES | _code_files(ttt_hf.ttt) | {"conversion.json"},
}


def _hub_env(env: dict, hub: FakeHub, home) -> dict:
    return {
        **env,
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": "hf_fake_token",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }


def _metadata(card: bytes) -> str:
    text = card.decode()
    assert text.startswith("---\n"), text[:200]
    return text.split("---")[1]


def test_publish_then_load_with_trust_remote_code_in_a_fresh_process(tmp_path):
    models = {"user/tiny-ttt": tiny_ttt("linear"), "user/tiny-block-state": tiny_block_state(3)}
    plan = {
        "push_to_hub": {},
        "tags": TAGS,
        "upload_folder": {
            "user/ttt-mlp-converted": str(
                convert_ttt_jax(JAX_FIXTURE / "streaming_params", tmp_path / "conv", progress=False)
            ),
        },
    }
    for repo, model in models.items():
        plan["push_to_hub"][repo] = str(tmp_path / repo.split("/")[1])
        model.save_pretrained(plan["push_to_hub"][repo])
    official = load_file(JAX_FIXTURE / "data.safetensors")
    inputs = {repo: random_ids(2, 21, seed=5) for repo in models}
    inputs["user/ttt-mlp-converted"] = official["input_ids"]
    torch.save(inputs, tmp_path / "inputs.pt")

    with FakeHub() as hub:
        publish = subprocess.run(
            [sys.executable, "-c", _PUBLISH, json.dumps(plan)],
            capture_output=True,
            text=True,
            env=_hub_env(dict(os.environ), hub, tmp_path / "publish_home"),
        )
        assert publish.returncode == 0, publish.stderr[-3000:]
        for repo, files in EXPECTED_FILES.items():
            assert set(hub.repos[repo]) == files, repo
            assert hub.lfs_files[repo] == {"model.safetensors"}, repo  # the weights went through git LFS
        for repo in models:
            metadata = _metadata(hub.repos[repo]["README.md"])
            assert "library_name: transformers" in metadata and all(f"- {tag}" in metadata for tag in TAGS), metadata
        metadata = _metadata(hub.repos["user/ttt-mlp-converted"]["README.md"])
        for line in ("library_name: transformers", "pipeline_tag: text-generation", "- ttt-mlp", "- custom_code"):
            assert line in metadata, metadata
        assert sum(r.startswith("PUT /lfs-storage/") for r in hub.requests) == len(EXPECTED_FILES)

        download = subprocess.run(
            [sys.executable, "-c", _DOWNLOAD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
            capture_output=True,
            text=True,
            env=_hub_env(env_without_ttt_hf(tmp_path), hub, tmp_path / "fresh_home"),
        )
        assert download.returncode == 0, download.stderr[-3000:]

    results = torch.load(tmp_path / "out.pt")
    assert results["ttt_hf_modules"] == []
    assert all(results[repo]["class"].startswith("transformers_modules.") for repo in inputs)
    for repo, model in models.items():
        with torch.no_grad():
            assert torch.equal(results[repo]["logits"], model.eval()(inputs[repo]).logits), repo
    assert (results["user/ttt-mlp-converted"]["logits"] - official["logits"]).abs().max().item() <= 1e-5
