"""IncrementalDetokenizer against whole decodes, token by token, on random outputs: the bundled tokenizer
(byte-level BPE: characters split across tokens) and a SentencePiece-style one built here (Metaspace with byte
fallback and the leading-space strip of Llama/Mixtral tokenizers, where a window's text depends on its context)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from expertyard.engine.detokenizer import IncrementalDetokenizer
from expertyard.entrypoints.common import bundled_model_path, load_tokenizer


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    pieces = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "!", "▁", "a", "▁a", "b", ".", "▁."]
    pieces += [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: "€" = <0xE2><0x82><0xAC>
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                               byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"bundled": load_tokenizer(bundled_model_path()), "sentencepiece-like": _sentencepiece_like()}


def _chunks(draw, units: list[list[int]]) -> list[list[int]]:
    """Random outputs made of `units` (a token, or the tokens of one character), cut into steps of 1-3 tokens
    anywhere, so characters are often split across steps."""
    flat = [t for unit in draw(st.lists(st.sampled_from(units), min_size=1, max_size=40)) for t in unit]
    cuts, i = [], 0
    while i < len(flat):
        n = draw(st.integers(1, 3))
        cuts.append(flat[i:i + n])
        i += n
    return cuts


def _check(tok, chunks: list[list[int]]) -> None:
    detok, out, shown = IncrementalDetokenizer(tok), [], []
    for chunk in chunks:
        out += chunk
        whole = tok.decode(out, skip_special_tokens=True)
        held = detok.update(out)
        shown.append(held)
        # the whole decode, unless that ends in an incomplete character (held back here; a byte-fallback
        # decoder then also shows the complete characters of the same byte run as U+FFFD)
        assert held == whole or whole.endswith("\ufffd")
    final = detok.final(out)
    assert final == tok.decode(out, skip_special_tokens=True)
    assert all(final.startswith(text) for text in shown)  # text once shown is never taken back


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_text_is_the_whole_decode_byte_level(data):
    """Any token ids at all: byte-level BPE decodes the bytes of the whole output at once, and a UTF-8 decoder
    resynchronises at any complete character, so even invalid byte runs come out alike."""
    tok = TOKENIZERS["bundled"]
    units = [[t] for t in range(len(tok))] + [tok(c, add_special_tokens=False).input_ids for c in "€ü日本"]
    _check(tok, _chunks(data.draw, units))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_text_is_the_whole_decode_sentencepiece(data):
    """Pieces and whole characters in byte-fallback pieces, split across steps anywhere. (Not invalid byte runs:
    a byte-fallback decoder turns every byte of an invalid run into U+FFFD, even bytes it had decoded alone, so a
    whole decode of garbage bytes can rewrite text already shown; valid text never does.)"""
    tok = TOKENIZERS["sentencepiece-like"]
    pieces = [[tok.convert_tokens_to_ids(p)] for p in ("<s>", "</s>", "▁Hello", "▁world", "!", "▁", "a", "▁a", "b",
                                                        ".", "▁.")]
    chars = [[tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in c.encode()] for c in "€ü日x"]
    _check(tok, _chunks(data.draw, pieces + chars))


def test_a_split_character_appears_once_complete():
    tok = TOKENIZERS["sentencepiece-like"]
    hello, e2, x82, xac = (tok.convert_tokens_to_ids(p) for p in ("▁Hello", "<0xE2>", "<0x82>", "<0xAC>"))
    detok = IncrementalDetokenizer(tok)
    assert detok.update([hello]) == "Hello"  # the leading space of the first piece is stripped, as decode does
    assert detok.update([hello, e2]) == "Hello"
    assert detok.update([hello, e2, x82]) == "Hello"
    assert detok.update([hello, e2, x82, xac]) == "Hello€"
    assert IncrementalDetokenizer(tok).final([hello, e2]) == tok.decode([hello, e2]) == "Hello\ufffd"
