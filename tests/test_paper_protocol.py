"""`aptp evaluate --protocol paper` on a tiny fake MS-COCO folder with a tiny random CLIP."""

import json
import math

import numpy as np
import torch
from conftest import make_tiny_clip
from PIL import Image
from test_pipeline import aptp_pipeline  # noqa: F401  (the tiny mixture, a module fixture)

from aptp.cli import main
from aptp.evaluation.paper import to_256


def fake_coco(root, count: int = 5):
    """``count`` captioned val2014 images of random colours and shapes (the last one corrupt)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(count):
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        if i == count - 1:
            (root / "val2014" / name).write_bytes(b"not a jpeg")
        else:
            pixels = rng.integers(0, 255, (48 + 16 * i, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val2014" / name)
        images.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "caption": f"a photo number {i}"}, {"image_id": i, "caption": "again"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images,
                                                                            "annotations": annotations}))
    return root


def test_paper_protocol_writes_fid_clip_score_and_cmmd(aptp_pipeline, tmp_path, capsys):  # noqa: F811
    aptp_pipeline.save_pretrained(tmp_path / "aptp")
    aptp_pipeline.experts[2].save_pretrained(tmp_path / "small")
    coco, clip = fake_coco(tmp_path / "coco"), make_tiny_clip(tmp_path)
    out = tmp_path / "paper"
    assert main(["evaluate", "--protocol", "paper", "--data", f"coco:{coco}", "--n", "5", "--clip", str(clip),
                 "--pipeline", str(tmp_path / "aptp"), "--unet", f"small={tmp_path / 'small'}", "--output-dir",
                 str(out), "--set", "steps=2", "batch_size=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    protocol = metrics["protocol"]
    assert protocol["n_images"] == 4 and protocol["unreadable_images_skipped"] == 1
    assert protocol["scheduler"] == "pndm" and protocol["guidance_scale"] == 7.5 and "256 px" in protocol["fid"]
    assert set(metrics["models"]) == {"dense", "APTP", "small"}
    for row in metrics["models"].values():
        assert all(math.isfinite(row[key]) for key in ("fid", "clip_score", "cmmd", "macs_fraction"))
    assert metrics["models"]["small"]["macs_fraction"] < 1 == metrics["models"]["dense"]["macs_fraction"]
    assert "CLIP score" in capsys.readouterr().out
    assert main(["evaluate", "--protocol", "paper", "--pipeline", str(tmp_path / "aptp"), "--output-dir",
                 str(tmp_path / "x")]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_real_images_are_centre_cropped_to_256():
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 50, 200))  # a red band outside the central square
    tensor = to_256(image)
    assert tensor.shape == (3, 256, 256)
    torch.testing.assert_close(tensor[:, 128, 128], torch.tensor([10, 20, 30]) / 255.0)
    assert tensor[0].max() < 0.1, "the band left of the central square is cropped away"
