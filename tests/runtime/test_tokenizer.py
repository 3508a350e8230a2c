"""Tokenizer: BOS insertion, chat template, incremental detokenization equal to a full decode."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accel_models.runtime.demo import build_tokenizer
from accel_models.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def test_bos_and_special_tokens(tok, tok_dir):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    # a tokenizer.json without a BOS post-processor still gets BOS when tokenizer_config asks for it
    raw = json.loads((tok_dir / "tokenizer.json").read_text())
    raw["post_processor"] = None
    d2 = tok_dir / "nopost"
    d2.mkdir(exist_ok=True)
    (d2 / "tokenizer.json").write_text(json.dumps(raw))
    (d2 / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    assert Tokenizer(d2).encode("Hello world") == ids
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (d2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(d2).encode("Hello world") == ids[1:]


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<s><|user|> Hi\n<|assistant|> "
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(1) == 1 and ids[0] == 1  # BOS once, from the template


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


@given(st.lists(st.integers(0, 383), min_size=1, max_size=30), st.booleans())
def test_incremental_detokenization_equals_full_decode(tok, ids, skip):
    det = IncrementalDetokenizer(tok, [1, 100], skip_special_tokens=skip)
    pieces = [det.step(t) for t in ids]
    full = tok.decode(ids, skip_special_tokens=skip)
    # text still held back (an incomplete UTF-8 sequence at the end) is only ever a suffix
    assert "".join(pieces) == det.text
    assert full.startswith(det.text) or full.rstrip("\ufffd").startswith(det.text.rstrip("\ufffd"))
    if not full.endswith("\ufffd"):
        assert det.text == full


def test_multibyte_characters_appear_once_complete(tok):
    ids = tok.encode("é€😀", add_special_tokens=False)
    assert len(ids) > 3  # byte-level pieces
    det = IncrementalDetokenizer(tok, [1])
    pieces = [det.step(t) for t in ids]
    assert "".join(pieces) == "é€😀"
    assert all("\ufffd" not in p for p in pieces)
