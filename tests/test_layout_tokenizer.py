"""The layout tokenizer (ldm_jax/conditioning/layout.py): format, round trip, validation."""

import warnings

import numpy as np
import pytest

from ldm_jax import UserError
from ldm_jax.conditioning.layout import (BOS_ID, EOS_ID, PAD_ID, LayoutError, LayoutTokenizer,
                                         LayoutTruncationWarning, parse_layout)


def layout(labels, boxes):
    return np.asarray(labels, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def test_format_and_vocab():
    tok = LayoutTokenizer(10, grid=32, max_length=16)
    assert tok.vocab_size == 3 + 10 + 32 * 32
    ids = tok([layout([7, 3], [[0.0, 0.0, 1.0, 1.0], [0.5, 0.25, 0.75, 1.0]])])
    assert ids.shape == (1, 16) and ids.dtype == np.int32
    row = ids[0].tolist()
    g, off = 31, 3 + 10
    assert row[:8] == [BOS_ID, 3 + 7, off + 0, off + 31 * 32 + 31,
                       3 + 3, off + round(0.25 * g) * 32 + round(0.5 * g),
                       off + 31 * 32 + round(0.75 * g), EOS_ID]
    assert row[8:] == [PAD_ID] * 8
    assert tok.identity() == {"kind": "layout", "format": "class,top_left,bottom_right",
                              "num_classes": 10, "grid": 32, "max_length": 16,
                              "vocab_size": 1037, "pad_id": 0, "bos_id": 1, "eos_id": 2}


def test_round_trip_within_one_cell():
    rng = np.random.default_rng(0)
    tok = LayoutTokenizer(5, grid=16, max_length=77)
    layouts = []
    for n in (0, 1, 4, 25):
        a, b = rng.uniform(0, 1, (n, 2, 2)).transpose(1, 0, 2)
        boxes = np.concatenate([np.minimum(a, b), np.maximum(a, b) + 1e-3], axis=1).clip(0, 1)
        boxes = boxes[:, [0, 1, 2, 3]]
        layouts.append(layout(rng.integers(0, 5, n), boxes))
    ids = tok(layouts)
    for (labels, boxes), row in zip(layouts, ids):
        got_labels, got_boxes = tok.decode(row)
        np.testing.assert_array_equal(got_labels, labels)
        assert got_boxes.shape == boxes.shape and got_boxes.dtype == np.float32
        assert np.all(np.abs(got_boxes - boxes) <= 0.5 / 15 + 1e-6)


def test_null_layout():
    tok = LayoutTokenizer(10, grid=32, max_length=8)
    null = tok([layout([], [])])[0]
    assert null.tolist() == [BOS_ID, EOS_ID] + [PAD_ID] * 6
    np.testing.assert_array_equal(tok.null(), null)
    labels, boxes = tok.decode(null)
    assert labels.shape == (0,) and boxes.shape == (0, 4)
    assert tok([]).shape == (0, 8)


@pytest.mark.parametrize("labels, boxes, match", [
    ([1], [[0.1, 0.1, 1.2, 0.5]], r"layout 0, object 0: box coordinate 1\.2.* outside \[0, 1\]"),
    ([1, 2], [[0.1, 0.1, 0.2, 0.2], [0.5, 0.1, 0.4, 0.5]], r"object 1: box .* x1 > x0"),
    ([1], [[0.1, 0.5, 0.2, 0.5]], r"object 0: box .* y1 > y0"),
    ([10], [[0.1, 0.1, 0.2, 0.2]], r"object 0: class id 10 is outside \[0, 10\)"),
    ([-1], [[0.1, 0.1, 0.2, 0.2]], r"class id -1"),
    ([1, 2], [[0.1, 0.1, 0.2, 0.2]], r"2 labels for 1 boxes"),
    ([1], [[float("nan"), 0.1, 0.2, 0.2]], r"box coordinate nan"),
])
def test_validation_errors(labels, boxes, match):
    tok = LayoutTokenizer(10)
    with pytest.raises(LayoutError, match=match) as info:
        tok([(np.asarray(labels), np.asarray(boxes, np.float32))])
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_truncation_warns_once():
    tok = LayoutTokenizer(3, grid=8, max_length=8)  # (8 - 2) // 3 = 2 objects fit
    assert tok.max_objects == 2
    many = layout([0, 1, 2], [[0, 0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok([many, many, layout([0], [[0, 0, 1, 1]])])
    assert len(caught) == 1 and issubclass(caught[0].category, LayoutTruncationWarning)
    assert "2 of 3 layouts" in str(caught[0].message)
    labels, _ = tok.decode(ids[0])
    assert labels.tolist() == [0, 1] and ids[0, -1] == EOS_ID


def test_parse_layout_ids_and_names():
    labels, boxes = parse_layout("7:0.1,0.1,0.45,0.45;3:0.55,0.5,0.95,0.95")
    assert labels.tolist() == [7, 3] and labels.dtype == np.int64
    np.testing.assert_allclose(boxes, [[0.1, 0.1, 0.45, 0.45], [0.55, 0.5, 0.95, 0.95]])
    assert boxes.dtype == np.float32
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    labels, _ = parse_layout(" Seven : 0.1, 0.1, 0.45, 0.45 ; 3:0.55,0.5,0.95,0.95;", names)
    assert labels.tolist() == [7, 3]
    empty_labels, empty_boxes = parse_layout("")
    assert empty_labels.shape == (0,) and empty_boxes.shape == (0, 4)
    tok = LayoutTokenizer(10, max_length=16)
    assert tok([parse_layout("")])[0].tolist() == tok.null().tolist()


@pytest.mark.parametrize("text, names, match", [
    ("7;0.1,0.1,0.2,0.2", (), r"object 0 .*expected CLASS:x0,y0,x1,y1"),
    ("7:0.1,0.1,0.2", (), r"object 0 .*four numbers"),
    ("7:0.1,0.1,0.2,abc", (), r"four numbers"),
    ("0:0,0,0.5,0.5;cat:0.1,0.1,0.2,0.2", ("dog",), r"object 1: unknown class 'cat'.*'dog'"),
    ("3:0.1,0.1,0.2,0.2", ("a", "b"), r"class id 3 is outside \[0, 2\)"),
    ("3:0.5,0.1,0.2,0.2", (), r"object 0: box .*x1 > x0"),
    ("3:0.1,0.1,0.2,1.5", (), r"box coordinate 1\.5"),
])
def test_parse_layout_errors(text, names, match):
    with pytest.raises(LayoutError, match=match):
        parse_layout(text, names)


def test_decode_rejects_garbage_and_bad_settings():
    tok = LayoutTokenizer(2, grid=4, max_length=8)
    with pytest.raises(LayoutError, match="start with"):
        tok.decode([5, 1, 2])
    with pytest.raises(LayoutError, match="not a class token"):
        tok.decode([BOS_ID, 10, 10, 10, EOS_ID])
    with pytest.raises(LayoutError, match="single layout"):
        tok(layout([0], [[0, 0, 1, 1]]))
    with pytest.raises(LayoutError, match="num_classes"):
        LayoutTokenizer(0)
