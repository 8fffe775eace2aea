"""The output's tokens go with its text: held while their text is, dropped past a stop string,
never the stop token (pure, with the tiny byte-level tokenizer)."""

from __future__ import annotations

from aegaeon.gateway.output_text import OutputText

TEXT = "the quick brown fox. The end."


def decoder(tiny_tokenizer):
    return lambda ids: tiny_tokenizer.decode(list(ids), skip_special_tokens=True)


def ids_of(tiny_tokenizer, text: str) -> list[int]:
    return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokens_wait_while_their_text_may_begin_a_stop_string_then_follow_it(tiny_tokenizer):
    decode = decoder(tiny_tokenizer)
    ids = ids_of(tiny_tokenizer, TEXT)
    output = OutputText(decode, ["fox!"], [])
    released: list[int] = []
    logprobs: list = []
    shown = ""
    for i, token in enumerate(ids):
        delta = output.feed([token], [(-float(token), [])], None)
        released, shown = released + delta.token_ids, shown + delta.text
        logprobs += delta.logprobs
        # Every token out begins before the text out ends; the text out is theirs.
        assert decode(released).startswith(shown)
        assert not released or len(decode(released[:-1])) < len(shown)
        if decode(ids[: i + 1]).endswith("fox"):  # it may begin "fox!": "ox" waits
            assert not shown.endswith("fox") and decode(released).endswith(" f")
    assert released == ids and shown == TEXT
    assert logprobs == [(-float(t), []) for t in ids]


def test_a_stop_string_drops_its_tokens_and_all_after_it_in_the_same_event(tiny_tokenizer):
    ids = ids_of(tiny_tokenizer, TEXT)
    output = OutputText(decoder(tiny_tokenizer), ["brown"], [])
    delta = output.feed(ids, [None] * len(ids), None)
    assert output.stopped and delta.text == "the quick "
    assert tiny_tokenizer.decode(delta.token_ids) == "the quick "
    assert output.feed(ids[:1], [None], "length").token_ids == []  # late tokens: not output


def test_the_stop_token_ends_the_output_without_being_part_of_it(tiny_tokenizer):
    eos = tiny_tokenizer.convert_tokens_to_ids("<|eos|>")
    ids = ids_of(tiny_tokenizer, TEXT)
    output = OutputText(decoder(tiny_tokenizer), [], [eos])
    delta = output.feed([*ids, eos], [None] * (len(ids) + 1), "stop")
    assert delta.token_ids == ids and delta.text == TEXT
    ignored = OutputText(decoder(tiny_tokenizer), [], [])  # ignore_eos: EOS is plain output
    assert ignored.feed([*ids, eos], [None] * (len(ids) + 1), "length").token_ids == [*ids, eos]
