"""The demo-model factory writes loadable Hugging Face folders, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

from aegaeon.model_store.demo import DEMO_SPECS, create_demo_models


def test_demo_models_are_hugging_face_folders_with_a_chat_template(demo_models_dir: Path):
    from transformers import AutoTokenizer

    types = set()
    for spec in DEMO_SPECS:
        folder = demo_models_dir / spec.name
        config = json.loads((folder / "config.json").read_text())
        types.add(config["model_type"])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
        )
        assert text.endswith("<|im_start|>assistant\n")
        assert (
            tokenizer.decode(tokenizer("The harbour town woke early.")["input_ids"])
            == "The harbour town woke early."
        )
    assert {"llama", "qwen2", "mistral", "gpt2"} <= types


def test_demo_models_are_deterministic_and_sizes_differ(demo_models_dir: Path, tmp_path: Path):
    create_demo_models(tmp_path, progress=False)
    sizes = []
    for spec in DEMO_SPECS[:3]:
        ours = (tmp_path / spec.name / "model.safetensors").read_bytes()
        assert ours == (demo_models_dir / spec.name / "model.safetensors").read_bytes()
        sizes.append(len(ours))
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
