"""The extraction pipeline without Ray: faults handled and counted, vectors equal to direct model calls.
(Real data, the H&M photos, runs through ``ray job submit`` in test_ray_cluster.py.)

Tolerances: text vectors (L2-normalised) within 1e-5 absolute of a one-item-at-a-time
transformers loop; MobileNetV2 features within rtol 1e-4 / atol 1e-5 of a one-image-at-a-time
forward pass. Batching and padding are the only differences; both are float32 rounding.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from dprec.data.dataset import load_dataset
from dprec.features import read_features
from dprec.features.config import TextConfig
from dprec.features.pipeline import ExtractError, run_extract
from dprec.features.prompt import render_item
from dprec.features.shards import load_manifest


def test_generated_faults_are_flagged_and_counted(generated, generated_reference):
    feats = read_features(generated_reference, dataset=generated)
    manifest = load_manifest(generated_reference)
    assert manifest["counts"] == {
        "image_decode_error": 1,
        "image_file_missing": 1,
        "image_none": 1,
        "image_url_not_fetched": 1,
        "text_empty": 1,
        "text_truncated": 1,
    }
    assert np.flatnonzero(feats["text_missing"]).tolist() == [2]
    assert np.flatnonzero(feats["image_missing"]).tolist() == [5, 7, 10, 11]
    assert not feats["text"][2].any() and not feats["image"][[5, 7, 10, 11]].any()
    assert feats["text"][4].any() and np.isfinite(feats["text"]).all()
    with tarfile.open(generated_reference / "items-000001.tar") as tar:
        meta = json.loads(tar.extractfile("000000005.meta.json").read())
    assert meta == {
        "flags": ["image_decode_error"],
        "image_missing": True,
        "item_id": "G005",
        "item_idx": 5,
        "text_missing": False,
    }
    assert manifest["spec"]["modalities"]["text"]["pooling"] == "mean"
    assert manifest["dims"] == {"image": 1280, "text": 384}


def test_generated_vectors_equal_direct_computation(generated, generated_reference, direct):
    dataset = load_dataset(generated)
    feats = read_features(generated_reference, dataset=dataset)
    text_rows = [i for i in range(dataset.n_items) if i not in (2, 4)]  # 2 empty, 4 cut to fit the token limit
    np.testing.assert_allclose(feats["text"][text_rows], direct.text(dataset, text_rows), atol=1e-5)
    image_rows = [i for i in range(dataset.n_items) if not feats["image_missing"][i]]
    assert 8 in image_rows  # the image given as a file relative to the dataset folder
    np.testing.assert_allclose(feats["image"][image_rows], direct.image(dataset, image_rows), rtol=1e-4, atol=1e-5)


def test_rerun_skips_everything_and_changes_nothing(generated, generated_reference, make_config, read_shard_bytes):
    before = read_shard_bytes(generated_reference)
    manifest_before = (generated_reference / "manifest.json").read_bytes()
    summary = run_extract(make_config(generated, generated_reference))
    assert (summary.shards_written, summary.shards_skipped, summary.items_computed) == (0, 4, 0)
    assert read_shard_bytes(generated_reference) == before
    assert (generated_reference / "manifest.json").read_bytes() == manifest_before


def test_non_utf8_text_bytes_are_decoded_and_counted(generated, tmp_path, make_config):
    """Bytes in a text column arise from items tables written by other tools, or handed to the library in memory."""
    dataset = load_dataset(generated)
    dataset.items["description"] = dataset.items["description"].astype(object)
    dataset.items.at[1, "description"] = b"Caf\xe9 cr\xe8me kettle"  # Latin-1, not UTF-8
    dataset.items.at[3, "description"] = "ok bytes \u2713".encode()
    cfg = make_config(generated, tmp_path, image=None)
    summary = run_extract(cfg, dataset=dataset)
    assert summary.failures == {"text_empty": 1, "text_not_utf8": 1, "text_truncated": 1}
    feats = read_features(tmp_path)
    assert not feats["text_missing"][1] and feats["text"][1].any()
    assert "image" not in feats


def test_template_with_extra_attributes(tmp_path, make_config, make_items_dataset, direct):
    """A view built from items.extra (MovieLens: genres, year, director, cast): rendered, embedded, counted."""
    extras = [
        {"director": ["Jane Campion"], "cast": ["Holly Hunter", "Harvey Keitel"], "release_year": "1993"},
        {"director": ["John Lasseter"], "cast": ["Tom Hanks"], "release_year": 1995},
        {"cast": []},  # no attribute the template shows, and no categories: text_empty
        {"director": "Akira Kurosawa"},
    ]
    items = pd.DataFrame(
        {
            "item_idx": range(4),
            "item_id": [f"M{i}" for i in range(4)],
            "title": ["The Piano", "Toy Story", "Blank", "Ran"],
            "categories": ["Drama|Romance", "Animation|Comedy", "", "Drama"],
            "extra": [json.dumps(e) for e in extras],
        }
    )
    folder = make_items_dataset(tmp_path / "movies", items, "movies")
    template = "Genres: {categories}\nYear: {release_year}\nDirector: {director}\nCast: {cast}"
    out = tmp_path / "view-b"
    summary = run_extract(
        make_config(folder, out, image=None, text=TextConfig(model="minilm", prompt_template=template))
    )
    assert summary.failures == {"text_empty": 1}
    feats = read_features(out, dataset=folder)
    assert np.flatnonzero(feats["text_missing"]).tolist() == [2]
    assert load_manifest(out)["spec"]["modalities"]["text"]["prompt_template"] == template

    prompt = render_item(
        {
            "categories": "Drama|Romance",
            "release_year": "1993",
            "director": "Jane Campion",
            "cast": "Holly Hunter, Harvey Keitel",
        },
        template,
    )
    assert prompt == "Genres: Drama, Romance\nYear: 1993\nDirector: Jane Campion\nCast: Holly Hunter, Harvey Keitel"
    with torch.inference_mode():
        enc = direct.tokenizer(prompt, return_tensors="pt")
        ref = torch.nn.functional.normalize(direct.text_model(**enc).last_hidden_state[0].mean(0), dim=0).numpy()
    np.testing.assert_allclose(feats["text"][0], ref, atol=1e-5)
    assert feats["text"][3].any()  # a director alone is text

    with pytest.raises(ExtractError, match=r"\['studio'\]"):
        run_extract(
            make_config(
                folder,
                tmp_path / "bad",
                image=None,
                text=TextConfig(model="minilm", prompt_template="{title} by {studio}"),
            )
        )
