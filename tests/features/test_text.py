"""Text encoders: prompt building, field cleaning, pooling against direct transformers, SmolLM2's cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from dprec.config import from_dict
from dprec.features.config import TextConfig
from dprec.features.prompt import LLM_TEMPLATE, clean_field, render_item
from dprec.features.text import TextEncoder, TextModelError, ensure_smollm2_cache, length_batches, resolve_text_model
from dprec.io import sha256_file

FIELDS = [
    {"title": "Copper kettle", "brand": "Acme", "categories": "kitchen|tea", "description": "Boils water fast."},
    {"title": "Trowel", "brand": "", "categories": "garden", "description": ""},
    {"title": "Yoga mat", "brand": "Stark", "categories": "", "description": "Non-slip, 6 mm thick, " * 8},
]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(resolve_text_model(TextConfig(model="minilm"), "cpu"), batch_size=2)


def direct_mean_pool(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 pipeline by hand, one text at a time: mean pool, L2 normalise."""
    tok, model = encoder.tokenizer, encoder.model
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tok(text, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).numpy())
    return np.stack(out)


def test_render_item_labels_fields_and_skips_empty():
    text = render_item(FIELDS[1], "{item}")
    assert text == "Title: Trowel\nCategories: garden"
    prompt = render_item(FIELDS[0], LLM_TEMPLATE)
    assert prompt.startswith('This item: "Title: Copper kettle\nBrand: Acme\nCategories: kitchen, tea\nDescription: ')
    assert prompt.endswith('" means in one word:"')
    assert render_item(FIELDS[0], "{title} by {brand}") == "Copper kettle by Acme"


def test_clean_field_decodes_and_flags():
    assert clean_field(" plain ", 100) == ("plain", [])
    assert clean_field("café".encode(), 100) == ("café", [])
    value, flags = clean_field(b"caf\xe9 \xff", 100)  # Latin-1 bytes, not UTF-8
    assert value == "caf\ufffd \ufffd" and flags == ["text_not_utf8"]
    assert clean_field(None, 10) == ("", [])
    assert clean_field(float("nan"), 10) == ("", [])
    assert clean_field("x" * 50, 10) == ("x" * 10, ["text_truncated"])


def test_config_validation():
    with pytest.raises(ValueError, match="pooling"):
        from_dict(TextConfig, {"pooling": "max"})
    with pytest.raises(ValueError, match="prompt template"):
        TextConfig(prompt_template="no placeholders")
    with pytest.raises(ValueError, match="plain name"):
        TextConfig(prompt_template="{0} and {title}")
    with pytest.raises(ValueError, match="plain name"):
        TextConfig(prompt_template="{price:>8}")
    assert TextConfig(prompt_template="{title} by {director} ({release_year})").extra_fields() == [
        "director",
        "release_year",
    ]


def test_length_batches_bound_padding_and_size():
    lengths = [10, 50, 11, 12, 48, 9, 10, 49]
    # fixed-size batches of 4 over the sorted order: one batch mixes 12 with 48, 49 -> much padding
    assert length_batches(lengths, 4) == [[5, 0, 6, 2], [3, 4, 7, 1]]
    # padding bounded by 10 %: the short and the long prompts are not batched together
    batches = length_batches(lengths, 4, max_padding=0.1)
    assert batches == [[5, 0, 6, 2], [3], [4, 7, 1]]
    for b in batches:
        longest, real = max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert len(b) * longest - real <= 0.1 * len(b) * longest
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches([], 4, 0.1) == []
    assert length_batches([7] * 5, 2, 0.0) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="max_padding"):
        TextConfig(max_padding=1.5)


def test_minilm_resolves_as_mean_pooled_encoder(minilm):
    r = minilm.resolved
    assert (r.pooling, r.prompt_template, r.max_length, r.normalize, r.dtype) == (
        "mean",
        "{item}",
        256,
        True,
        "float32",
    )
    assert r.revision["weights_sha256"]["model.safetensors"]
    assert minilm.dim == 384


def test_minilm_equals_direct_transformers(minilm):
    vectors, flags = minilm.encode_items(FIELDS)
    direct = direct_mean_pool(minilm, [render_item(f, "{item}") for f in FIELDS])
    # batched + padded vs one at a time: equal up to float32 rounding in attention over padding
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    assert flags == [[], [], []]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batches_sorted_by_length_give_order_independent_vectors(minilm):
    vectors, _ = minilm.encode_items(FIELDS)
    reversed_vectors, _ = minilm.encode_items(FIELDS[::-1])
    np.testing.assert_allclose(vectors, reversed_vectors[::-1], atol=1e-6)


def test_empty_text_is_a_zero_vector_and_flagged(minilm):
    vectors, flags = minilm.encode_items([{"title": "", "brand": "", "categories": "", "description": ""}, FIELDS[0]])
    assert flags[0] == ["text_empty"] and not vectors[0].any() and vectors[1].any()


def test_long_description_is_cut_so_the_template_ending_survives(minilm):
    cfg = TextConfig(model="minilm", max_length=32, prompt_template='Item: "{item}" END')
    enc = TextEncoder(resolve_text_model(cfg, "cpu"), batch_size=2)
    fields = dict(FIELDS[0], description="water " * 2000)
    ids, cut = enc.prompt_ids(fields)
    assert cut and len(ids) <= 32
    assert enc.tokenizer.decode(ids, skip_special_tokens=True).rstrip().endswith('" end')  # uncased tokenizer
    vectors, flags = enc.encode_items([fields])
    assert flags == [["text_truncated"]] and np.isfinite(vectors).all()


def test_unknown_text_model_is_a_clear_error(tmp_path):
    with pytest.raises(TextModelError, match="text model .*cannot read its config"):
        resolve_text_model(TextConfig(model=str(tmp_path / "missing-model")), "cpu")


@pytest.mark.slow
def test_smollm2_gguf_cached_as_safetensors_and_last_token_pooled(tmp_path):
    cache = tmp_path / "models"
    t0 = time.perf_counter()
    path, gguf_sha = ensure_smollm2_cache(cache)  # dequantises the GGUF once (tens of seconds)
    build_seconds = time.perf_counter() - t0
    assert (path / "model.safetensors").is_file() and (path / "dprec_source.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary build folder left behind"
    t0 = time.perf_counter()
    again, _ = ensure_smollm2_cache(cache)
    assert again == path and time.perf_counter() - t0 < min(5.0, build_seconds)

    resolved = resolve_text_model(TextConfig(model="smollm2", cache_dir=str(cache)), "cpu")
    assert (resolved.pooling, resolved.prompt_template, resolved.dtype) == ("last", LLM_TEMPLATE, "float32")
    weights = {"model.safetensors": sha256_file(path / "model.safetensors")}  # the converted weights, pinned
    assert resolved.revision == {
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": gguf_sha,
        "weights_sha256": weights,
    }
    recorded = json.loads((path / "dprec_source.json").read_text())["files"]
    assert recorded["model.safetensors"] == weights["model.safetensors"] and "tokenizer.json" in recorded
    t0 = time.perf_counter()
    enc = TextEncoder(resolved, batch_size=2)
    assert time.perf_counter() - t0 < 15, "the safetensors copy should load in seconds, not dequantise again"
    vectors, flags = enc.encode_items(FIELDS)
    assert vectors.shape == (3, 576) and flags == [[], [], []]
    with torch.inference_mode():
        for i, fields in enumerate(FIELDS):
            ids = enc.tokenizer(render_item(fields, LLM_TEMPLATE), return_tensors="pt")
            last = enc.model(**ids).last_hidden_state[0, -1].numpy()
            np.testing.assert_allclose(vectors[i], last, rtol=1e-4, atol=1e-4)
