"""Incremental detokenization is exact and never emits a broken character; stop strings are
held back until they can be ruled out."""

from __future__ import annotations

import random

import pytest
from aegaeon.gateway.detokenizer import IncrementalDetokenizer, StopMatcher
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .tokenizer_factory import CORPUS, train_byte_level


def train_metaspace() -> Tokenizer:
    """SentencePiece-like: a leading-space marker the decoder drops at the start of a string,
    so decoding a window alone differs from decoding it in context."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *byte_tokens])
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def demo_tokenizer() -> Tokenizer:
    """The tokenizer every demo model ships (model-store's factory)."""
    from aegaeon.model_store.demo import train_tokenizer

    return train_tokenizer()


TOKENIZERS = {
    "byte-level": train_byte_level(),
    "metaspace": train_metaspace(),
    "demo-models": demo_tokenizer(),
}


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        step = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.feed(ids[i : i + step]))
        i += step
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_deltas_concatenate_to_decode_of_random_ids(name):
    tok = TOKENIZERS[name]
    decode = tok.decode
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        deltas = stream(IncrementalDetokenizer(decode), ids, rng)
        assert "".join(deltas) == decode(ids)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_deltas_of_real_text_are_exact_and_never_hold_a_broken_character(name):
    tok = TOKENIZERS[name]
    rng = random.Random(3)
    for text in CORPUS:
        ids = tok.encode(text).ids
        deltas = stream(IncrementalDetokenizer(tok.decode), ids, rng)
        assert "".join(deltas) == tok.decode(ids)
        assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_split_over_tokens_is_held_until_complete():
    tok = TOKENIZERS["byte-level"]
    ids = tok.encode("🙂").ids
    assert len(ids) > 1, "the test tokenizer must split the emoji"
    detok = IncrementalDetokenizer(tok.decode)
    assert [detok.feed([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.feed(ids[-1:]) == "🙂"


def test_output_ending_inside_a_character_is_flushed_as_decode_renders_it():
    tok = TOKENIZERS["byte-level"]
    ids = tok.encode("a🙂").ids[:-1]
    detok = IncrementalDetokenizer(tok.decode)
    text = detok.feed(ids) + detok.finish()
    assert text == tok.decode(ids)


def counting(decode):
    """``decode`` that adds up how many ids it was given (the detokenizer's work)."""
    work = {"ids": 0}

    def wrapped(ids):
        work["ids"] += len(ids)
        return decode(ids)

    return wrapped, work


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("text", [" ", "\n", "\ufffd", " \ufffd", "\t\n "])
def test_hostile_outputs_cost_linear_work_and_stay_exact(name, text):
    """Whitespace-only output, and output ending in a literal U+FFFD, once re-decoded everything
    at each token (quadratic on the gateway's event loop)."""
    tok = TOKENIZERS[name]
    unit = tok.encode(text).ids
    ids = unit * (2000 // len(unit))
    decode, work = counting(tok.decode)
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.feed([i]) for i in ids] + [detok.finish()]
    assert "".join(deltas) == tok.decode(ids)
    assert work["ids"] < 100 * len(ids)  # quadratic would be ~1000×


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


def test_stop_string_split_across_deltas_is_found_and_not_sent():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("Hello ST") == "Hello "
    assert matcher.feed("O") == ""
    assert matcher.feed("P and more") == ""
    assert matcher.stopped


def test_partial_stop_that_does_not_complete_is_released():
    assert feed_all(StopMatcher(["STOP"]), ["a ST", "ORM", " b"]) == "a STORM b"


def test_partial_stop_at_the_end_of_output_is_flushed():
    assert feed_all(StopMatcher(["STOP"]), ["end ST"]) == "end ST"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"


def test_no_stop_strings_pass_text_through_at_once():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc" and not matcher.stopped


def test_text_after_a_stop_is_dropped():
    matcher = StopMatcher(["\n"])
    assert matcher.feed("one\ntwo") == "one"
    assert matcher.feed("three") == "" and matcher.flush() == ""


def first_completed_stop(text: str, stops: list[str]) -> str:
    """Reference: generate a character at a time and stop as soon as a stop string ends."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)]
    return text


def test_stop_matcher_against_a_brute_force_reference():
    rng = random.Random(11)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 20)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(2)]
        expected = first_completed_stop(text, stops)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert feed_all(StopMatcher(stops), pieces) == expected, (text, stops, pieces)
