"""A tiny model folder for gateway tests: a byte-level BPE tokenizer trained here, whose vocabulary
splits multi-byte characters across tokens, plus config files with eos and context length."""

from __future__ import annotations

import json
import shutil
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


def with_added_tokens(model: Path, folder: Path, special: list[str], plain: list[str]) -> Path:
    """A copy of a model folder whose tokenizer has more added tokens, ``special`` ones (as
    ChatML's ``<|im_end|>``: skipped when decoding) and ``plain`` ones (kept in the text)."""
    shutil.copytree(model, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    tok.save(str(folder / "tokenizer.json"))
    return folder


SPACE = "\u2581"  # SentencePiece's "▁"


def write_sentencepiece_model(folder: Path) -> Path:
    """A Llama-2-style tokenizer folder: SentencePiece pieces (``▁`` for a space) with byte
    fallback (``<0xC3>`` for a byte no piece covers), and Llama's decoder, which strips the
    space the pre-tokenizer put before the text."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    merges = [(SPACE, "w"), ("o", "r"), (SPACE + "w", "or"), ("l", "d"), (SPACE + "wor", "ld")]
    for piece in [SPACE, "w", "o", "r", "l", "d", *("".join(pair) for pair in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first")
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    return folder
