"""``aegaeon models add FILE.gguf``: a GGUF file written here the way llama.cpp's
``convert_hf_to_gguf.py`` writes a Llama (q/k rows permuted, byte-level BPE tokenizer, chat
template) is imported into a Hugging Face folder that serves the same tokens as the source model and
as transformers' own GGUF loading, with quantized tensors dequantized to the values transformers
gives, and every refusal leaving the models directory as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from aegaeon.model_store.cli import register
from aegaeon.model_store.demo import CHAT_TEMPLATE, train_tokenizer
from aegaeon.model_store.files import read_chunk
from aegaeon.model_store.gguf_import import ORIGIN_FILE
from aegaeon.model_store.registry import ModelError, describe
from safetensors.torch import load_file

from aegaeon.protocol import FetchFile, SamplingParams

PROMPTS = [[5, 17, 30, 42, 9, 11, 250, 3, 77, 120], [100, 200, 300, 7]]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]
HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def source() -> tuple[Any, Any]:
    """A small random-weight Llama and the project's trained demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=256, bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
        eos_token_id=tokenizer.token_to_id("<|im_end|>"), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # larger logits: greedy decoding without near-ties
        for layer in model.model.layers:  # sharp attention: q/k rows in the wrong order show
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return model, tokenizer


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers' GGUF loader undoes it."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tokenizer(writer: Any, tokenizer: Any) -> None:
    data = json.loads(tokenizer.to_str())
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([control if t in special else normal for t in tokens])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    )
    writer.add_bos_token_id(tokenizer.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_metadata(writer: Any, config: Any) -> None:
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(path: Path, model: Any, tokenizer: Any, quantized: bool = False) -> Path:
    """``model`` as llama.cpp writes a Llama. ``quantized``: the layers' matrices in Q8_0 and the
    embeddings in F16 (norms stay F32, as llama.cpp keeps them)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_metadata(writer, model.config)
    _add_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        values = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, KV_HEADS)
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if quantized and ".layers." in hf_name and values.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        elif quantized and values.ndim == 2:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(source, tmp_path_factory) -> Path:
    model, tokenizer = source
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model, tokenizer)


@pytest.fixture(scope="module")
def imported(gguf_file, tmp_path_factory) -> Path:
    return register(gguf_file, tmp_path_factory.mktemp("models"))


def engine_tokens(folder: Path, tmp_path: Path) -> list[list[int]]:
    """Greedy tokens of the project's engine serving ``folder``, for each of PROMPTS."""
    engine = Engine(EngineConfig(device="cpu", dtype="float32", arena_bytes=64 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip
    try:
        engine.register_model("gguf", folder)
        engine.switch_to("gguf")
        ids = [f"r{i}" for i in range(len(PROMPTS))]
        for rid, prompt in zip(ids, PROMPTS, strict=True):
            engine.add_request(rid, "gguf", prompt, GREEDY)
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        while live := [rid for rid in ids if rid in engine.request_ids()]:
            for out in engine.step(live):
                assert out.error is None, out.error
                got[out.request_id].append(out.token_id)
        return [got[rid] for rid in ids]
    finally:
        engine.close()


def generate(model: Any) -> list[list[int]]:
    refs = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
        refs.append(ids[0, len(prompt) :].tolist())
    return refs


# ---------------------------------------------------------------- the imported folder


def test_a_gguf_file_becomes_a_described_folder_with_the_source_weights(source, imported) -> None:
    model, tokenizer = source
    assert imported.name == "tiny-llama-F32" and not imported.is_symlink()
    info = describe(imported)
    assert (info.architecture, info.model_type, info.dtype) == (
        "LlamaForCausalLM",
        "llama",
        "float32",
    )
    weights = load_file(imported / "model.safetensors")
    expected = model.state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():  # q/k rows back in Hugging Face order
        assert torch.equal(weights[name], tensor), name
    generation = json.loads((imported / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    tokenizer_config = json.loads((imported / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_the_engine_serving_the_import_generates_the_source_models_tokens(
    source, imported, tmp_path
) -> None:
    model, _ = source
    assert engine_tokens(imported, tmp_path) == generate(model)


def test_the_engine_serving_the_import_generates_what_transformers_generates_from_the_gguf(
    gguf_file, imported, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert engine_tokens(imported, tmp_path) == generate(reference.eval())


def test_the_imported_tokenizer_encodes_a_chat_as_transformers_gguf_tokenizer_does(
    source, gguf_file, imported
) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(imported)
    assert tokenizer.chat_template == reference.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert ids == source[1].encode(text).ids  # and as the tokenizer written into the file


def test_quantized_tensors_dequantize_to_what_transformers_loader_gives(source, tmp_path) -> None:
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, tokenizer = source
    path = write_gguf(tmp_path / "tiny-q8.gguf", model, tokenizer, quantized=True)
    folder = register(path, tmp_path / "models", name="tiny-q8")
    weights = load_file(folder / "model.safetensors")
    loaded = load_gguf_checkpoint(str(path), return_tensors=True,
                                  model_to_load=LlamaForCausalLM(model.config))["tensors"]  # fmt: skip
    assert weights.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert torch.equal(weights[name].float(), tensor.float()), name
        assert torch.allclose(tensor.float(), model.state_dict()[name], atol=0.02), name
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # was Q8_0
    assert weights["model.embed_tokens.weight"].dtype == torch.float16  # was F16: kept
    assert weights["model.norm.weight"].dtype == torch.float32


def test_a_tokenizer_config_beside_the_file_does_not_leak_into_the_import(
    gguf_file, tmp_path
) -> None:
    """A GGUF kept inside another model's folder is read on its own."""
    beside = tmp_path / "some-model"
    beside.mkdir()
    shutil.copy(gguf_file, beside)  # a copy: a link would resolve to the file's own folder
    (beside / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    folder = register(beside / gguf_file.name, tmp_path / "models")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] != "BertTokenizer"


# ---------------------------------------------------------------- refusals


def _unknown_architecture(path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "fancy")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not a gguf file" * 100), "not a readable GGUF file"),
        (_unknown_architecture, "GGUF architecture 'fancy': .* not supported"),
    ],
    ids=["not-gguf", "unknown-architecture"],
)
def test_an_unreadable_or_unsupported_file_is_refused_and_leaves_nothing(
    tmp_path, make, message
) -> None:
    path = tmp_path / "model.gguf"
    make(path)
    models = tmp_path / "models"
    with pytest.raises(ModelError, match=message) as refused:
        register(path, models)
    assert str(path) in str(refused.value)
    assert not models.exists() or not list(models.iterdir())


def test_a_model_too_large_for_the_running_workers_is_removed_after_conversion(
    gguf_file, tmp_path
) -> None:
    models = tmp_path / "models"
    with pytest.raises(ModelError, match="largest weight slot"):
        register(gguf_file, models, slot_bytes=1024)
    assert not list(models.iterdir())  # the converted folder is gone, hidden staging included


def test_a_taken_name_is_refused_before_converting_another_file(gguf_file, imported, tmp_path) -> None:  # fmt: skip
    before = sorted(p.name for p in imported.parent.iterdir())
    other = tmp_path / gguf_file.name  # the same bytes, but another file
    shutil.copyfile(gguf_file, other)
    with pytest.raises(ModelError, match="already registered"):
        register(other, imported.parent)
    assert sorted(p.name for p in imported.parent.iterdir()) == before


def test_adding_the_same_gguf_file_again_is_harmless_and_converts_nothing(
    gguf_file, imported, monkeypatch
) -> None:
    from aegaeon.model_store import cli

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(cli, "import_gguf", no_conversion)
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}
    assert register(gguf_file, imported.parent) == imported  # was: refused, "already registered"
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before
    origin = json.loads((imported / ORIGIN_FILE).read_text())
    assert origin["source"] == str(gguf_file.resolve())
    assert describe(imported).name == imported.name  # the record is no model file
    assert read_chunk(imported, FetchFile(imported.name, ORIGIN_FILE, 0, 100)).error


def test_a_gguf_file_rewritten_since_its_import_is_refused_under_the_taken_name(gguf_file, tmp_path) -> None:  # fmt: skip
    source = tmp_path / "tiny.gguf"
    shutil.copyfile(gguf_file, source)
    folder = register(source, tmp_path / "models")
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # another version of it
    with pytest.raises(ModelError, match="already registered"):
        register(source, tmp_path / "models")
    assert folder.is_dir()


def test_models_cli_adds_a_gguf_file(gguf_file, tmp_path, capsys) -> None:
    from aegaeon.cli import main

    models = tmp_path / "models"
    argv = ["models", "add", str(gguf_file), "--name", "tiny", "--models-dir", str(models)]
    assert main(argv) == 0
    assert "registered tiny" in capsys.readouterr().out
    assert main(["models", "list", "--models-dir", str(models), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["model_type"]) for m in listed["models"]] == [("tiny", "llama")]
    assert main([*argv, "--priority", "high"]) == 0  # the same file again: as a folder is
    assert "already registered tiny" in capsys.readouterr().out
    other = tmp_path / "other.gguf"
    shutil.copyfile(gguf_file, other)
    assert main(["models", "add", str(other), "--name", "tiny", "--models-dir", str(models)]) == 1
    assert "already registered" in capsys.readouterr().err


def test_a_gguf_file_given_through_a_link_is_imported_by_the_name_given(gguf_file, tmp_path) -> None:  # fmt: skip
    # A hub cache: snapshots/<rev>/x.gguf is a link to blobs/<hash> (no .gguf suffix).
    blob = tmp_path / "blobs" / "9f2c1e"
    blob.parent.mkdir()
    shutil.copyfile(gguf_file, blob)
    link = tmp_path / "snapshots" / "rev" / "tiny-llama.F32.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    folder = register(link, tmp_path / "models")
    assert folder.name == "tiny-llama-F32" and (folder / "model.safetensors").is_file()


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_an_import_killed_midway_leaves_no_staging_folder_behind(gguf_file, tmp_path) -> None:
    models = tmp_path / "models"
    abandoned, running, young = (models / f".m{i}.x.importing" for i in range(3))
    for folder in (abandoned, running, young):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    for folder in (abandoned, running):
        os.utime(folder, (time.time() - 600, time.time() - 600))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(running)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        register(gguf_file, models, name="tiny")  # the next import sweeps
        assert not abandoned.exists()  # its process is gone
        assert running.exists() and young.exists()  # locked; or perhaps not locked yet
    finally:
        holder.kill()
        holder.wait()
    assert (models / "tiny" / "model.safetensors").is_file()
