"""A checkpoint of a real model's size and shape, as a new user brings one: registered with
``aegaeon models add`` and served by ``aegaeon up`` with no sizing flag, token-exact against
transformers. (On 2026-11-28 a 538 MB SmolLM-135M failed its first request: its weights did not
fit the fixed 512 MiB slot.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from aegaeon.bench.stack_process import wait_healthy
from aegaeon.servers import free_port

SMOLLM_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}  # fmt: skip
"""SmolLM-135M-Instruct's config.json (HuggingFaceTB), the model of the failed first request."""

PROMPT = "Name three things a lighthouse keeper does."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm_shaped(tmp_path_factory, demo_models_dir: Path) -> Path:
    """Random weights in SmolLM-135M's shape, fp32 (≥ 500 MB), with the demo tokenizer and its
    chat template (its ids are all inside the model's vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("checkpoints") / "smollm-135m-shaped"
    torch.manual_seed(135)
    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / "demo-llama")
    config = LlamaConfig(**SMOLLM_135M, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    # The demo tokenizer knows the first len(tokenizer) ids: zero the other rows of the tied
    # embedding so greedy decoding picks ids it can spell (their logits are 0, an in-vocabulary
    # one is larger); otherwise both sides would agree on text that decodes to nothing.
    with torch.no_grad():
        model.model.embed_tokens.weight[len(tokenizer) :] = 0
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo_models_dir / "demo-llama" / name).exists():
            shutil.copy(demo_models_dir / "demo-llama" / name, folder / name)
    assert (folder / "model.safetensors").stat().st_size >= 500e6
    return folder


def _reference(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_538_mb_checkpoint_serves_on_up_defaults_token_exact(smollm_shaped: Path, tmp_path):
    home = tmp_path / "home"
    shm = Path("/dev/shm" if Path("/dev/shm").is_dir() else tmp_path) / f"aegaeon-test-{uuid.uuid4().hex[:8]}"  # fmt: skip
    shm.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGAEON_")}
    env |= {"AEGAEON_HOME": str(home), "AEGAEON_SHM_DIR": str(shm)}
    added = subprocess.run([sys.executable, "-m", "aegaeon.cli", "models", "add", str(smollm_shaped)],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert added.returncode == 0, added.stderr
    port = free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 (the launcher writes it until stopped)
    launcher = subprocess.Popen([sys.executable, "-m", "aegaeon.cli", "up", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", launcher, 300, f"see {tmp_path / 'up.log'}")
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", timeout=240,
            json={"model": smollm_shaped.name, "max_tokens": MAX_TOKENS, "temperature": 0,
                  "messages": [{"role": "user", "content": PROMPT}]},
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        expected = _reference(smollm_shaped)
        assert expected and reply.json()["choices"][0]["message"]["content"] == expected
    finally:
        log.close()
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                launcher.kill()
        shutil.rmtree(shm, ignore_errors=True)
