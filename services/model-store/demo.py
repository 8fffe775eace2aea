"""``aegaeon models create-demo DIR``: small random-weight models in Hugging Face layout.

Every model gets config.json, generation_config.json, model.safetensors and a real byte-level BPE
tokenizer (trained on the bundled corpus) with a ChatML chat template. Weights are random but
deterministic (fixed seeds) and scaled so that logits have clear top-2 margins: greedy decoding
then has no near-ties, which the exactness tests rely on.

The default set runs four models together on a 2-core CPU; ``--large`` adds a 7B-shaped Llama in
bf16 for GPU measurements, written tensor by tensor so it never sits in memory twice.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "corpus"
VOCAB_TARGET = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class DemoSpec:
    """One demo model: its folder name, architecture and shape."""

    name: str
    model_type: str  # llama | qwen2 | mistral | gpt2
    hidden: int
    layers: int
    heads: int
    kv_heads: int = 0
    intermediate: int = 0
    tied: bool = False
    dtype: str = "float32"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


DEMO_SPECS = [
    DemoSpec("demo-llama", "llama", 256, 4, 8, 4, 704, seed=1,
             extra={"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 256}}),
    DemoSpec("demo-qwen2", "qwen2", 384, 6, 6, 2, 1024, tied=True, seed=2),
    DemoSpec("demo-mistral", "mistral", 512, 8, 8, 2, 1536, seed=3,
             extra={"sliding_window": 4096}),
    DemoSpec("demo-gpt2", "gpt2", 256, 4, 4, seed=4),
]  # fmt: skip
"""The default demo set: three Llama-family variants of growing size and one GPT-2."""

LARGE_SPEC = DemoSpec(
    "demo-llama-7b", "llama", 4096, 32, 32, 32, 11008, dtype="bfloat16", seed=7,
    extra={"vocab_size": 32000},
)  # fmt: skip
"""A Llama-2-7B-shaped model in bf16 (13.5 GB) for GPU switch and decode measurements."""


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on the bundled corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = sorted(str(p) for p in CORPUS.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no tokenizer corpus (*.txt) in {CORPUS}")
    tokenizer.train(files, trainer)
    return tokenizer


def _write_tokenizer(tokenizer: Any, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------- configs


def _config(spec: DemoSpec, vocab: int, eos: int, bos: int) -> dict[str, Any]:
    if spec.model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_embd": spec.hidden, "n_layer": spec.layers, "n_head": spec.heads,
            "n_positions": 1024, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "bos_token_id": bos, "eos_token_id": eos,
            "tie_word_embeddings": True, "torch_dtype": spec.dtype, "dtype": spec.dtype,
        }  # fmt: skip
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    config = {
        "architectures": [arch[spec.model_type]], "model_type": spec.model_type,
        "vocab_size": vocab, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tied, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": spec.dtype, "dtype": spec.dtype, "attention_bias": False,
    }  # fmt: skip
    config.update({k: v for k, v in spec.extra.items() if k != "vocab_size"})
    return config


# ---------------------------------------------------------------------------- weights


Shapes = list[tuple[str, tuple[int, ...], float]]


def _tensor_shapes(spec: DemoSpec, vocab: int) -> Shapes:
    """(HF name, shape, init std) of every weight; std 0 means ones, -1 means zeros."""
    h = spec.hidden
    shapes: Shapes
    if spec.model_type == "gpt2":
        shapes = [
            ("transformer.wte.weight", (vocab, h), 3.0 * h**-0.5),
            ("transformer.wpe.weight", (1024, h), 0.1),
        ]
        for i in range(spec.layers):
            p = f"transformer.h.{i}."
            shapes += [
                (p + "ln_1.weight", (h,), 0.0), (p + "ln_1.bias", (h,), -1.0),
                (p + "attn.c_attn.weight", (h, 3 * h), h**-0.5), (p + "attn.c_attn.bias", (3 * h,), 0.02),
                (p + "attn.c_proj.weight", (h, h), h**-0.5), (p + "attn.c_proj.bias", (h,), 0.02),
                (p + "ln_2.weight", (h,), 0.0), (p + "ln_2.bias", (h,), -1.0),
                (p + "mlp.c_fc.weight", (h, 4 * h), h**-0.5), (p + "mlp.c_fc.bias", (4 * h,), 0.02),
                (p + "mlp.c_proj.weight", (4 * h, h), (4 * h) ** -0.5), (p + "mlp.c_proj.bias", (h,), 0.02),
            ]  # fmt: skip
        return [
            *shapes,
            ("transformer.ln_f.weight", (h,), 0.0),
            ("transformer.ln_f.bias", (h,), -1.0),
        ]
    head_dim = h // spec.heads
    q, kv, inter = spec.heads * head_dim, spec.kv_heads * head_dim, spec.intermediate
    # Tied embeddings double as the LM head: keep them small, or each token predicts itself.
    shapes = [("model.embed_tokens.weight", (vocab, h), 3.0 * h**-0.5 if spec.tied else 1.0)]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,), 0.0),
            (p + "self_attn.q_proj.weight", (q, h), h**-0.5),
            (p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.v_proj.weight", (kv, h), h**-0.5),
            (p + "self_attn.o_proj.weight", (h, q), q**-0.5),
            (p + "post_attention_layernorm.weight", (h,), 0.0),
            (p + "mlp.gate_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.up_proj.weight", (inter, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, inter), inter**-0.5),
        ]
        if spec.model_type == "qwen2":  # Qwen2 carries biases on q, k and v only
            shapes += [
                (p + f"self_attn.{n}_proj.bias", (d,), 0.1)
                for n, d in (("q", q), ("k", kv), ("v", kv))
            ]
    shapes.append(("model.norm.weight", (h,), 0.0))
    if not spec.tied:
        shapes.append(("lm_head.weight", (vocab, h), 3.0 * h**-0.5))
    return shapes


def _fill(shape: tuple[int, ...], std: float, generator: Any, dtype: Any) -> Any:
    import torch

    if std == 0.0:
        return torch.ones(shape, dtype=dtype)
    if std < 0:
        return torch.zeros(shape, dtype=dtype)
    values = torch.randn(shape, generator=generator, device=generator.device)
    return (values * std).to(dtype).cpu()


def write_safetensors(path: Path, spec: DemoSpec, vocab: int, progress: Any = None) -> int:
    """Stream random weights into one safetensors file; returns the file's size."""
    import torch

    dtype = getattr(torch, spec.dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    shapes = _tensor_shapes(spec, vocab)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in shapes:
        nbytes = math.prod(shape) * esize
        header[name] = {
            "dtype": _ST_DTYPE[spec.dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # 64-byte aligned data section: views need no copy
    # The 7B-shaped model draws on the GPU when there is one: seconds instead of minutes.
    on_gpu = spec.dtype != "float32" and torch.cuda.is_available()
    generator = torch.Generator(device="cuda" if on_gpu else "cpu").manual_seed(spec.seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _name, shape, std in shapes:
            tensor = _fill(shape, std, generator, dtype)
            f.write(
                tensor.view(torch.uint8).numpy().tobytes()
                if dtype == torch.bfloat16
                else tensor.numpy().tobytes()
            )
            if progress is not None:
                progress.update(tensor.numel() * esize)
    return 8 + len(raw) + offset


def _param_bytes(spec: DemoSpec, vocab: int) -> int:
    import torch

    esize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    return sum(math.prod(shape) for _, shape, _ in _tensor_shapes(spec, vocab)) * esize


# ---------------------------------------------------------------------------- writer


def _write_model(spec: DemoSpec, out: Path, tokenizer: Any, progress: Any) -> Path:
    folder = out / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    vocab = int(spec.extra.get("vocab_size", tokenizer.get_vocab_size()))
    eos, bos = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = _config(spec, vocab, eos, bos)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": [eos, bos], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_tokenizer(tokenizer, folder)
    tmp = folder / "model.safetensors.tmp"
    write_safetensors(tmp, spec, vocab, progress)
    tmp.replace(folder / "model.safetensors")  # atomic: a half-written model is never seen
    return folder


def create_demo_models(out_dir: str | Path, *, large: bool = False, progress: bool = True, force: bool = False) -> list[Path]:  # fmt: skip
    """Write the demo models under ``out_dir`` (one folder each); returns their folders.

    Existing complete models are kept unless ``force``. ``large`` adds the 7B-shaped bf16 Llama.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [*DEMO_SPECS, LARGE_SPEC] if large else list(DEMO_SPECS)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    todo = [s for s in specs if force or not (out / s.name / "model.safetensors").is_file()]
    total = sum(_param_bytes(s, int(s.extra.get("vocab_size", vocab))) for s in todo)
    folders = []
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="demo models", disable=not progress
    ) as bar:
        for spec in specs:
            if spec in todo and force and (out / spec.name).exists():
                shutil.rmtree(out / spec.name)
            folders.append(
                _write_model(spec, out, tokenizer, bar) if spec in todo else out / spec.name
            )
    return folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to write the models into")
    parser.add_argument("--large", action="store_true", help="also write a 7B-shaped bf16 Llama")
    parser.add_argument("--force", action="store_true", help="overwrite existing models")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    folders = create_demo_models(
        args.dir, large=args.large, progress=not args.no_progress, force=args.force
    )
    for folder in folders:
        print(folder)
    return 0
