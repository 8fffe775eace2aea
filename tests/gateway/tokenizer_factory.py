"""A tiny model folder for gateway tests: a byte-level BPE tokenizer trained here, whose vocabulary
splits multi-byte characters across tokens, plus config files with eos and context length."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "Hello world, héllo wörld. Ünïcode text: 日本語のテスト, 中文, emoji 🙂🚀 and plain words.",
    "The quick brown fox jumps over the lazy dog; naïve café façade résumé.",
    "STOP here. Stop there. END of text, the end.",
]
EOS = "<|eos|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_byte_level(vocab_size: int = 300) -> Tokenizer:
    """Small enough that most non-ASCII characters span two or more tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_model(folder: Path, context_length: int = 128) -> Path:
    """A Hugging Face layout folder with only what the gateway reads."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level()
    tok.save(str(folder / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = {"eos_token_id": eos_id, "max_position_embeddings": context_length}
    (folder / "config.json").write_text(json.dumps(model_config))
    return folder
