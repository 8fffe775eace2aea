"""With each token's bytes known, the detokenizer holds text back only while the output's bytes
end inside a character that may still complete: broken bytes stream as they come (they once
showed nothing until the end of the output), a character split over tokens still waits."""

from __future__ import annotations

import random

import pytest
from aegaeon.gateway.detokenizer import IncrementalDetokenizer
from aegaeon.gateway.token_bytes import gpt2_byte_decoder
from aegaeon.gateway.tokenization import ModelTokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from .test_detokenizer import TOKENIZERS, counting, stream
from .tokenizer_factory import write_sentencepiece_model

BROKEN = "\ufffd"


def model_tokenizer(tok: Tokenizer) -> ModelTokenizer:
    """The gateway's view of a tokenizer: ``decode`` (special tokens skipped) and
    ``output_bytes``."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    return ModelTokenizer(fast, eos_token_ids=[], vocab_size=tok.get_vocab_size())


MODEL_TOKENIZERS = {name: model_tokenizer(tok) for name, tok in TOKENIZERS.items()}


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    """A Llama-2-style tokenizer: byte-fallback tokens (``<0xE4>``) are ordinary tokens."""
    folder = write_sentencepiece_model(tmp_path_factory.mktemp("sentencepiece"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return ModelTokenizer(fast, eos_token_ids=[2], vocab_size=len(fast))


def detokenizer(tok: ModelTokenizer) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok.decode, tok.output_bytes, tok.spelling.is_byte_piece)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_deltas_of_random_ids_concatenate_to_decode_with_bytes_followed(name):
    tok = MODEL_TOKENIZERS[name]
    assert tok.output_bytes(0) is not None, "these vocabularies spell their bytes"
    rng = random.Random(11)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(detokenizer(tok), ids, rng)) == tok.decode(ids)


def byte_token(tok: ModelTokenizer, byte: int) -> int:
    """The id of the token that is this one byte alone."""
    if tok.spelling.spelling == "sentencepiece":
        piece = f"<0x{byte:02X}>"
    else:
        piece = next(c for c, b in gpt2_byte_decoder().items() if b == byte)
    found = tok.tokenizer.convert_tokens_to_ids(piece)
    assert isinstance(found, int) and tok.decode([found]), piece
    return found


@pytest.mark.parametrize("name", ["byte-level", "demo-models"])
def test_broken_bytes_stream_as_they_come_and_the_text_after_them_too(name):
    tok = MODEL_TOKENIZERS[name]
    detok = detokenizer(tok)
    stray = [byte_token(tok, b) for b in (0x80, 0xBF, 0xFF)]  # no character starts so
    deltas = [detok.feed([i]) for i in stray]
    assert deltas[0] == BROKEN and all(d for d in deltas)  # each as soon as it came
    later = tok.tokenizer.encode(" world", add_special_tokens=False)
    deltas.append(detok.feed(later))
    assert deltas[-1].endswith("world")
    assert "".join(deltas) + detok.finish() == tok.decode(stray + later)


@pytest.mark.parametrize("name", ["byte-level", "demo-models"])
def test_a_character_split_over_byte_tokens_waits_until_complete(name):
    tok = MODEL_TOKENIZERS[name]
    detok = detokenizer(tok)
    ids = [byte_token(tok, b) for b in "中".encode()]
    assert [detok.feed([i]) for i in ids] == ["", "", "中"]


@pytest.mark.parametrize("bytes_in_run", [b"\xe4\xb8\xad\xff", "中文".encode()])
def test_a_run_of_byte_fallback_tokens_comes_whole_when_it_ends(sentencepiece, bytes_in_run):
    """SentencePiece's byte fallback decodes a run of byte tokens together: a broken byte at its
    end turns the characters before it into U+FFFD too, so nothing of a run shows before the
    run ends (a piece follows, or the output does)."""
    tok = sentencepiece
    detok = detokenizer(tok)
    run = [byte_token(tok, b) for b in bytes_in_run]
    assert [detok.feed([i]) for i in run] == [""] * len(run)
    after = tok.tokenizer.encode("world", add_special_tokens=False)
    assert detok.feed(after) == tok.decode(run + after)
    detok = detokenizer(tok)
    assert "".join(detok.feed([i]) for i in run) + detok.finish() == tok.decode(run)


def test_special_tokens_add_no_bytes_and_unknown_spellings_none():
    tok = model_tokenizer(TOKENIZERS["demo-models"])  # its own: the spelling is changed below
    special = tok.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tok.output_bytes(special) == b""
    plain = tok.tokenizer.encode("hello", add_special_tokens=False)[0]
    assert tok.output_bytes(plain) == tok.spelling.bytes_of(plain)
    tok.spelling.spelling = "text"  # a decoder whose spelling of bytes cannot be read
    assert tok.output_bytes(plain) is None


@pytest.mark.parametrize("name", ["byte-level", "demo-models"])
def test_lead_bytes_that_never_complete_stream_one_token_behind(name):
    """A run of lead bytes (each one broken by the next) shows each as soon as the next came:
    only the last, which may still complete, waits."""
    tok = MODEL_TOKENIZERS[name]
    detok = detokenizer(tok)
    leads = [byte_token(tok, 0xD6)] * 6
    deltas = [detok.feed([i]) for i in leads]
    assert deltas == ["", *[BROKEN] * 5]
    later = tok.tokenizer.encode(" world", add_special_tokens=False)
    assert detok.feed(later) == BROKEN + tok.decode(later)
    assert "".join(deltas) + BROKEN + tok.decode(later) + detok.finish() == tok.decode(
        leads + later
    )


def test_byte_fallback_text_is_exact_for_random_ids(sentencepiece):
    """Byte tokens as ordinary tokens (Llama 2's vocabulary): a run is decoded whole, so its
    characters can turn into U+FFFD when a broken byte joins it; deltas still add up."""
    rng = random.Random(5)
    for _ in range(500):
        ids = [rng.randrange(3, sentencepiece.vocab_size) for _ in range(rng.randrange(1, 30))]
        deltas = stream(detokenizer(sentencepiece), ids, rng)
        assert "".join(deltas) == sentencepiece.decode(ids)


@pytest.mark.parametrize("name", ["byte-level", "demo-models"])
def test_a_long_run_of_broken_bytes_costs_linear_work(name):
    tok = MODEL_TOKENIZERS[name]
    ids = [byte_token(tok, 0xD6), byte_token(tok, 0x80), byte_token(tok, 0xD6)] * 700
    decode, work = counting(tok.decode)
    detok = IncrementalDetokenizer(decode, tok.output_bytes, tok.spelling.is_byte_piece)
    deltas = [detok.feed([i]) for i in ids] + [detok.finish()]
    assert "".join(deltas) == tok.decode(ids)
    assert sum(1 for d in deltas if d) > len(ids) // 2  # streamed, not held to the end
    assert work["ids"] < 100 * len(ids)
