"""The world dataset: deterministic generation, disjoint splits, imagefolder export, CLI, and the shipped evaluator."""

import argparse
import itertools
import json
import math
import random

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from aptp.utils import APTPError
from aptp.world import generator
from aptp.world.cli import add_world_parser

ROUND_TRIP_PER_CATEGORY = 64
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def image_bytes(samples):
    return [s.image.tobytes() for s in samples]


def mirrored(attributes):
    """The same two-object scene described from the other object: "B right of A" for "A left of B"."""
    a = attributes
    return {"shape1": a["shape2"], "color1": a["color2"], "relation": OPPOSITE[a["relation"]],
            "shape2": a["shape1"], "color2": a["color1"], "background": a["background"]}  # fmt: skip


def world_parser():
    parser = argparse.ArgumentParser(prog="aptp")
    add_world_parser(parser.add_subparsers(dest="command", required=True))
    return parser


# --- generator ------------------------------------------------------------------------------------


def test_same_seed_same_samples_and_other_seed_differs():
    first, again = generator.generate(12, "train", seed=3), generator.generate(12, "train", seed=3)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert image_bytes(first) == image_bytes(again)
    other = generator.generate(12, "train", seed=4)
    assert [s.prompt for s in other] != [s.prompt for s in first]
    assert all(a != b for a, b in zip(image_bytes(other), image_bytes(first)))


def test_samples_cycle_categories_and_captions_match_attributes():
    samples = generator.generate(8, "val", seed=1)
    assert [s.category for s in samples] == list(generator.CATEGORIES) * 2
    for s in samples:
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert tuple(s.attributes) == generator.ATTRIBUTE_KEYS[s.category]
        assert s.prompt == generator.make_prompt(s.attributes)
        assert s.attributes.get("color") != s.attributes["background"]
    only_text = generator.generate(3, categories=["text"])
    assert {s.category for s in only_text} == {"text"}
    assert only_text[0].prompt.startswith('the word "')


def test_prompt_examples():
    assert generator.make_prompt({"shape": "circle", "color": "red", "background": "white"}) == (
        "a red circle on a white background"
    )
    two = {"shape1": "circle", "color1": "orange", "relation": "left of", "shape2": "square", "color2": "blue",
           "background": "gray"}  # fmt: skip
    assert generator.make_prompt(two) == "an orange circle left of a blue square on a gray background"
    assert generator.make_prompt({"count": 3, "shape": "star", "color": "green", "background": "black"}) == (
        "three green stars on a black background"
    )
    assert generator.make_prompt({"word": "SUN", "color": "white", "background": "blue"}) == (
        'the word "SUN" in white on a blue background'
    )


def test_splits_share_no_prompts_and_are_roughly_80_10_10():
    for category in generator.CATEGORIES:
        prompts = {split: {generator.make_prompt(a) for a in generator.split_scenes(category, split)}
                   for split in generator.SPLITS}  # fmt: skip
        for a, b in itertools.combinations(generator.SPLITS, 2):
            assert not prompts[a] & prompts[b], (category, a, b)
            assert prompts[a] and prompts[b]
    scenes = {s: sum(len(generator.split_scenes(c, s)) for c in generator.CATEGORIES) for s in generator.SPLITS}
    total = sum(scenes.values())
    assert 0.75 < scenes["train"] / total < 0.85 and 0.07 < scenes["test"] / total < 0.13
    assert all(generator.split_of(s.attributes) == "test" for s in generator.generate(8, "test"))


def test_mirrored_two_object_prompts_land_in_the_same_split():
    for scene in generator.split_scenes("two", "val")[:50]:
        assert generator.split_of(mirrored(scene)) == "val"


@pytest.mark.parametrize("relation", generator.RELATIONS)
def test_two_object_layout_shows_the_relation_without_overlap(relation):
    rng = random.Random(relation)
    for _ in range(2000):
        (x1, y1, s1), (x2, y2, s2) = generator.place_pair(rng, relation)
        for x, y, s in ((x1, y1, s1), (x2, y2, s2)):
            assert 0 <= x - s / 2 and x + s / 2 <= 64 and 0 <= y - s / 2 and y + s / 2 <= 64
        along, across = {"left of": (x2 - x1, y2 - y1), "right of": (x1 - x2, y1 - y2),
                         "above": (y2 - y1, x2 - x1), "below": (y1 - y2, x1 - x2)}[relation]  # fmt: skip
        assert along >= (s1 + s2) / 2 and abs(across) <= along / 2


def test_counted_objects_stay_inside_and_apart():
    rng = random.Random(0)
    for _ in range(500):
        boxes = generator.place_apart(rng, 4, generator.COUNT_SIZE[4])
        for x, y, s in boxes:
            assert 0 <= x - s / 2 and x + s / 2 <= 64 and 0 <= y - s / 2 and y + s / 2 <= 64
        for (xa, ya, s), (xb, yb, _) in itertools.combinations(boxes, 2):
            assert math.dist((xa, ya), (xb, yb)) >= s


def test_generate_rejects_unknown_split_and_category():
    with pytest.raises(APTPError, match="split"):
        generator.generate(2, "holdout")
    with pytest.raises(APTPError, match="categor"):
        generator.generate(2, categories=["three"])


# --- export and CLI -------------------------------------------------------------------------------


def test_export_writes_images_and_metadata_byte_identically(tmp_path):
    first = generator.export_imagefolder(tmp_path / "a", 9, "val", seed=5)
    second = generator.export_imagefolder(tmp_path / "b", 9, "val", seed=5)
    records = [json.loads(line) for line in (first / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 9 and len(list(first.glob("*.png"))) == 9
    samples = generator.generate(9, "val", seed=5)
    for record, sample in zip(records, samples):
        assert (first / record["file_name"]).is_file()
        assert record["text"] == sample.prompt and record["category"] == sample.category
        assert {k: record[k] for k in sample.attributes} == sample.attributes
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for path in first.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging directories left behind
    (tmp_path / "empty").mkdir()
    generator.export_imagefolder(tmp_path / "empty", 2)
    assert len(list((tmp_path / "empty").iterdir())) == 3


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    written = []

    def interrupt_on_third(file_name, world_sample):
        written.append(file_name)
        if len(written) == 3:
            raise KeyboardInterrupt
        return {"file_name": file_name}

    monkeypatch.setattr(generator, "metadata_record", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        generator.export_imagefolder(tmp_path / "out", 5)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(APTPError, match="> 0"):
        generator.export_imagefolder(tmp_path / "out", 0)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(APTPError, match="is a file"):
        generator.export_imagefolder(a_file, 2)
    with pytest.raises(APTPError, match="not empty"):
        generator.export_imagefolder(tmp_path, 2)


def test_cli_export_and_preview(tmp_path, capsys):
    parser = world_parser()
    args = parser.parse_args(["world", "export", "--n", "6", "--split", "test", "--seed", "2", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 6
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 6
    args = parser.parse_args(["world", "preview", "--per-category", "3", "--scale", "1", str(tmp_path / "grid.png")])
    assert args.func(args) == 0
    output = capsys.readouterr().out.splitlines()
    assert len(output) == 2 and "6 test images" in output[0] and "preview" in output[1]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 66 + 2, 4 * 66 + 2)


def test_cli_bad_input_raises_aptp_error(tmp_path):
    parser = world_parser()
    args = parser.parse_args(["world", "export", "--n", "0", str(tmp_path / "out")])
    with pytest.raises(APTPError):
        args.func(args)
    (tmp_path / "taken").write_text("x")
    args = parser.parse_args(["world", "export", "--n", "3", str(tmp_path / "taken")])
    with pytest.raises(APTPError, match="is a file"):
        args.func(args)
    args = parser.parse_args(["world", "preview", str(tmp_path)])
    with pytest.raises(APTPError, match="directory"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["world", "export", "--split", "holdout", str(tmp_path / "out")])


# --- evaluator ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator():
    from aptp.world import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="module")
def test_samples():
    return generator.generate(ROUND_TRIP_PER_CATEGORY * len(generator.CATEGORIES), "test", seed=7)


def test_shipped_evaluator_reads_test_images_and_rejects_noise(evaluator, test_samples):
    from aptp.world import world_accuracy

    real = world_accuracy([s.image for s in test_samples], test_samples, evaluator)
    assert set(real) == {*generator.CATEGORIES, "overall"}
    assert all(score >= 0.9 for score in real.values()), real
    noise = torch.rand(len(test_samples), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scored_noise = world_accuracy(noise, test_samples, evaluator)
    assert scored_noise["overall"] < 0.5 and scored_noise["overall"] < real["overall"] - 0.4, scored_noise


def test_evaluator_inputs_pil_or_unit_tensor_of_any_size(evaluator, test_samples):
    from aptp.world.evaluator import to_tensor, world_accuracy

    samples = test_samples[:8]
    as_tensor = to_tensor([s.image for s in samples])
    assert as_tensor.shape == (8, 3, 64, 64) and 0 <= as_tensor.min() and as_tensor.max() <= 1
    assert evaluator.predict(as_tensor) == evaluator.predict([s.image for s in samples])
    upscaled = torch.nn.functional.interpolate(as_tensor, scale_factor=2, mode="nearest")
    assert world_accuracy(upscaled, samples, evaluator)["overall"] >= 0.9
    with pytest.raises(APTPError, match=r"\[0, 1\]"):
        world_accuracy(as_tensor * 2 - 1, samples, evaluator)
    with pytest.raises(APTPError, match="8 images"):
        world_accuracy(as_tensor, samples[:3], evaluator)


def test_world_accuracy_takes_attribute_dicts_and_mirrored_prompts(evaluator, test_samples):
    from aptp.world.evaluator import world_accuracy

    two = [s for s in test_samples if s.category == "two"][:8]
    images = [s.image for s in two]
    assert world_accuracy(images, [mirrored(s.attributes) for s in two], evaluator) == world_accuracy(
        images, two, evaluator
    )
    wrong = [{**s.attributes, "background": "gray" if s.attributes["background"] != "gray" else "white"} for s in two]
    assert world_accuracy(images, wrong, evaluator)["two"] <= world_accuracy(images, two, evaluator)["two"] - 1 / 6


def test_shipped_weights_are_small_fp16_with_recorded_metrics():
    from aptp.world import evaluator as world_evaluator

    weights = world_evaluator.WEIGHTS_DIR / world_evaluator.WEIGHTS_FILE
    assert weights.stat().st_size < 2 * 1024 * 1024
    with safe_open(str(weights), "pt") as tensors:
        dtypes = {tensors.get_slice(name).get_dtype() for name in tensors.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    metrics = json.loads((world_evaluator.WEIGHTS_DIR / world_evaluator.METRICS_FILE).read_text())
    assert min(metrics["attribute_accuracy"].values()) >= 0.95


def test_train_evaluator_runs_a_few_steps_and_round_trips(tmp_path):
    from aptp.world import evaluator as world_evaluator

    model = world_evaluator.train_evaluator(steps=2, batch_size=8, progress=False)
    world_evaluator.save_evaluator(model, tmp_path)
    loaded = world_evaluator.load_evaluator(tmp_path)
    predictions = loaded.predict([s.image for s in generator.generate(4, "val")])
    assert len(predictions) == 4
    assert all(prediction[name] in labels for prediction in predictions
               for name, labels in world_evaluator.HEADS.items())  # fmt: skip


def test_augment_keeps_shape_and_range():
    from aptp.world.evaluator import augment, to_tensor

    batch = to_tensor([s.image for s in generator.generate(4)])
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, batch)
