"""`push_to_hub` end to end against a fake Hub on 127.0.0.1 (tests/fake_hub.py): push a TTT and a Block-State
model, then a fresh process that cannot import ttt_hf downloads them with trust_remote_code=True."""

import subprocess
import sys
import textwrap

import torch
from block_state_testing import tiny_model as tiny_block_state
from fake_hub import FakeHub
from integration_testing import env_without_ttt_hf
from ttt_testing import random_ids
from ttt_testing import tiny_model as tiny_ttt

_PUSH = textwrap.dedent(
    """
    import sys
    import ttt_hf  # noqa: F401  (registers the Auto classes, so the model code is uploaded)
    from transformers import AutoModelForCausalLM

    for folder, repo in zip(sys.argv[1::2], sys.argv[2::2]):
        AutoModelForCausalLM.from_pretrained(folder).push_to_hub(repo, commit_message="upload from ttt-hf tests")
    """
)

_DOWNLOAD = textwrap.dedent(
    """
    import sys
    sys.modules["ttt_hf"] = None  # the editable install's finder would import it otherwise
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.load(sys.argv[1])
    results = {}
    for repo in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
        with torch.no_grad():
            results[repo] = {"logits": model(ids).logits, "class": type(model).__module__}
    results["ttt_hf_modules"] = [m for m in sys.modules if m.split(".")[0] == "ttt_hf" and sys.modules[m] is not None]
    torch.save(results, sys.argv[2])
    """
)

EXPECTED_FILES = {
    "user/tiny-ttt": {"config.json", "generation_config.json", "model.safetensors", "README.md",
                      "configuration_ttt.py", "modeling_ttt.py", "cache_ttt.py", "ttt_ops.py", "ttt_triton.py"},
    "user/tiny-block-state": {"config.json", "generation_config.json", "model.safetensors", "README.md",
                              "configuration_block_state.py", "modeling_block_state.py", "cache_block_state.py",
                              "ssm_ops.py"},
}


def _hub_env(env: dict, hub: FakeHub, home) -> dict:
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake_token", "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def test_push_to_hub_then_load_with_trust_remote_code_in_a_fresh_process(tmp_path):
    models = {"user/tiny-ttt": tiny_ttt("linear"), "user/tiny-block-state": tiny_block_state(3)}
    ids = random_ids(2, 21, seed=5)
    torch.save(ids, tmp_path / "ids.pt")
    push_args = []
    for repo, model in models.items():
        folder = tmp_path / repo.split("/")[1]
        model.save_pretrained(folder)
        push_args += [str(folder), repo]

    with FakeHub() as hub:
        push = subprocess.run([sys.executable, "-c", _PUSH, *push_args], capture_output=True, text=True,
                              env=_hub_env(dict(__import__("os").environ), hub, tmp_path / "push_home"))
        assert push.returncode == 0, push.stderr[-3000:]
        for repo, files in EXPECTED_FILES.items():
            assert set(hub.repos[repo]) == files, repo
            card = hub.repos[repo]["README.md"].decode()
            metadata = card.split("---")[1]
            assert "library_name: transformers" in metadata, card[:500]
        download = subprocess.run(
            [sys.executable, "-c", _DOWNLOAD, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *models],
            capture_output=True, text=True, env=_hub_env(env_without_ttt_hf(tmp_path), hub, tmp_path / "fresh_home"),
        )
        assert download.returncode == 0, download.stderr[-3000:]
        assert any(r.startswith("POST /api/models/user/tiny-ttt/commit/") for r in hub.requests)

    results = torch.load(tmp_path / "out.pt")
    assert results["ttt_hf_modules"] == []
    for repo, model in models.items():
        assert results[repo]["class"].startswith("transformers_modules.")
        with torch.no_grad():
            assert torch.equal(results[repo]["logits"], model.eval()(ids).logits)
