"""Captioned-image sources: imagefolder, COCO, CC3M TSV; corrupt and missing images are counted."""

import json

import pytest
import torch
from PIL import Image

from aptp.data import CaptionedImages, collate, load_cc3m, load_coco, load_imagefolder
from aptp.utils import APTPError


def _image(path, size=(40, 30), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_with_corrupt_and_missing_images(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", size=(16, 64))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"file_name": "a.png", "text": "a red square", "category": "single", "shape": "square"},
        {"file_name": "b.png", "caption": "a tall red image"},
        {"file_name": "broken.png", "text": "corrupt"},
        {"file_name": "gone.png", "text": "missing"},
        {"file_name": "a.png"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{oops\n")
    report = load_imagefolder(tmp_path)
    assert [r.caption for r in report.records] == ["a red square", "a tall red image", "corrupt"]
    assert report.records[0].category == "single" and report.records[0].attributes == {"shape": "square"}
    assert report.skipped == {"missing images": 1, "entries without file_name or caption": 1,
                              "malformed metadata lines": 1}
    batch = collate([CaptionedImages(report.records, 32)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["skipped"] == 1
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["prompt"] == ["a red square", "a tall red image"]


def test_coco_and_cc3m(tmp_path):
    _image(tmp_path / "coco" / "val2014" / "x.jpg")
    captions = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
                "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "a kitten"},
                                {"image_id": 2, "caption": "lost"}]}
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "captions_val2014.json").write_text(json.dumps(captions))
    assert [r.caption for r in load_coco(tmp_path / "coco").records] == ["a cat", "a kitten"]
    assert len(load_coco(tmp_path / "coco", one_caption_per_image=True).records) == 1
    _image(tmp_path / "cc" / "0001.jpg")
    (tmp_path / "cc.tsv").write_text("a dog on grass\t0001.jpg\nno file\t0002.jpg\nbroken row\n")
    report = load_cc3m(tmp_path / "cc.tsv", tmp_path / "cc")
    assert [r.caption for r in report.records] == ["a dog on grass"]
    assert report.skipped == {"missing images": 1, "malformed rows": 1}


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(APTPError, match="metadata.jsonl"):
        load_imagefolder(tmp_path)
    with pytest.raises(APTPError, match="COCO"):
        load_coco(tmp_path)
    with pytest.raises(APTPError, match="no such TSV"):
        load_cc3m(tmp_path / "x.tsv", tmp_path)
    with pytest.raises(APTPError, match="no captioned images"):
        CaptionedImages([], 32)
    assert collate([{"index": 0, "prompt": "x", "category": None, "pixel_values": None}])["pixel_values"] is None
    assert torch.is_tensor(collate([])["index"])


def test_encoded_cache_is_reused_only_for_the_same_source_and_leaves_the_global_rng_alone(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from aptp.data import WorldImages
    from aptp.training.cache import encode_dataset

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4, sample_size=64)
    calls = []

    def text(prompts):
        calls.append(len(prompts))
        return {"encoder_hidden_states": torch.zeros(len(prompts), 2, 3)}

    torch.manual_seed(1)
    first = encode_dataset(WorldImages(4), vae, text, tmp_path / "c", source={"seed": 0})
    after_encoding = torch.rand(1)
    torch.manual_seed(1)
    reused = encode_dataset(WorldImages(4), vae, text, tmp_path / "c", source={"seed": 0})
    assert torch.equal(torch.rand(1), after_encoding), "encoding or reusing must not move the global RNG"
    assert len(calls) == 1 and torch.equal(reused.tensor("latent_mean"), first.tensor("latent_mean"))
    encode_dataset(WorldImages(4), vae, text, tmp_path / "c", source={"seed": 1})
    assert len(calls) == 2, "another source of the same length is encoded again"
