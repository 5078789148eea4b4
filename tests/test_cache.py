"""The sharded encoded-data cache: rows across shard boundaries, resuming an interrupted encoding, damaged
shards and the single-file caches of earlier versions."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from aptp.training.cache import EncodedCache, encode_dataset
from aptp.utils import APTPError

UNREADABLE = {3, 8, 9}  # at 4 items per shard: 3, 4, 2 and 1 records; 2, 2, 1 and 1 batches of 2 to encode


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 13

    def __getitem__(self, i):
        pixels = None if i in UNREADABLE else torch.arange(48, dtype=torch.float32).reshape(3, 4, 4) * (i + 1)
        return {"index": i, "prompt": f"prompt {i % 5}", "category": ["a", "b"][i % 2], "pixel_values": pixels}


class VAE:
    device, dtype = "cpu", torch.float32

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def encode(self, pixels):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels[:, :2] / 7, std=pixels[:, 1:] / 3 + 1))


class Prompts:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, prompts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return {"hidden": torch.stack([torch.full((2, 3), len(p) / 3) for p in prompts])}


def sentences(prompts):
    return torch.stack([torch.tensor([float(len(p)), hash(p) % 7]) for p in prompts])


def encode(folder, vae=None, prompts=None, shards=(4, 2), source=None):
    return encode_dataset(Items(), vae or VAE(), prompts or Prompts(), folder, sentences, batch_size=2,
                          source=source or {"data": "items"}, command="aptp prune",
                          records_per_shard=shards[0], prompts_per_shard=shards[1])


NAMES = ("latent_mean", "latent_std", "prompt_index", "dataset_index", "conditioning.hidden", "prompt_embeddings")


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_rows_across_shard_boundaries_are_those_of_one_shard(tmp_path):
    sharded, whole = encode(tmp_path / "sharded"), encode(tmp_path / "whole", shards=(64, 64))
    assert len(list((tmp_path / "sharded").glob("records-*"))) == 4
    assert len(sharded) == len(whole) == 10 and sharded.skipped == whole.skipped == 3 and sharded.requested == 13
    assert sharded.prompts == whole.prompts and sharded.prompts[0] == "" and sharded.num_prompts == 5
    assert sharded.categories == whole.categories and sharded.conditioning == ["hidden"]
    rows = torch.tensor([9, 0, 3, 4, 3, 7, 8])  # out of order, repeated, on both sides of the boundaries
    for name in NAMES:
        count = len(sharded) if name in ("latent_mean", "latent_std", "prompt_index", "dataset_index") else 5
        picked = rows[rows < count] if count < len(sharded) else rows
        assert torch.equal(sharded.tensor(name), whole.tensor(name)), name
        assert torch.equal(sharded.rows(name, picked), whole.tensor(name)[picked]), name
        assert sharded.rows(name, picked.tolist()).dtype == whole.tensor(name).dtype
    assert sharded.tensor("conditioning.hidden").dtype == torch.float16
    assert sharded.tensor("dataset_index").tolist() == [i for i in range(13) if i not in UNREADABLE]
    assert torch.equal(sharded.prompt_index, whole.tensor("prompt_index"))
    assert sharded.rows("latent_mean", []).shape == (0, 2, 4, 4)
    with pytest.raises(IndexError):
        sharded.rows("latent_mean", [10])


@pytest.mark.parametrize("stop", ["records", "prompts"])
def test_an_interrupted_encoding_resumes_after_its_last_complete_shard(tmp_path, stop):
    straight = encode(tmp_path / "straight")
    vae = VAE(fail_after=3 if stop == "records" else None)
    prompts = Prompts(fail_after=2 if stop == "prompts" else None)
    with pytest.raises(KeyboardInterrupt):
        encode(tmp_path / "resumed", vae, prompts)
    assert not (tmp_path / "resumed" / "index.json").exists()
    vae, prompts = VAE(), Prompts()
    resumed = encode(tmp_path / "resumed", vae, prompts)
    # Stopped in shard 1 of the records or in shard 2 of the prompts (one batch of 2 prompts per shard).
    assert (vae.calls, prompts.calls) == ((4, 3) if stop == "records" else (0, 1))
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "straight")
    assert torch.equal(resumed.tensor("latent_mean"), straight.tensor("latent_mean"))
    # Another source is encoded again from the start.
    vae = VAE()
    encode(tmp_path / "resumed", vae, source={"data": "other"})
    assert vae.calls == 6


def test_a_damaged_shard_is_a_clear_error_and_encoded_again(tmp_path):
    encode(tmp_path / "c")
    shard = tmp_path / "c" / "records-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-50])
    with pytest.raises(APTPError, match=r"records-00001.safetensors is damaged .*run `aptp prune` again"):
        EncodedCache(tmp_path / "c", "aptp prune")
    shard.unlink()
    with pytest.raises(APTPError, match=r"records-00001.safetensors is damaged \(missing\)"):
        EncodedCache(tmp_path / "c", "aptp prune")
    vae = VAE()
    encode(tmp_path / "c", vae)
    assert vae.calls == 4 and shard.read_bytes() == whole  # shards 1 to 3 again, shard 0 kept
    with pytest.raises(APTPError, match="no encoded dataset in .*run `aptp assign`"):
        EncodedCache(tmp_path / "nothing", "aptp assign")
    cache = EncodedCache(tmp_path / "c")
    shard.unlink()  # gone while open: found when read
    with pytest.raises(APTPError, match=r"records-00001.safetensors is damaged \(missing\)"):
        cache.rows("latent_mean", [5])


def test_a_single_file_cache_of_earlier_versions_is_converted(tmp_path):
    fresh = encode(tmp_path / "fresh")
    tensors = {**{name: fresh.tensor(name) for name in NAMES}, "requested": torch.tensor(13),
               "skipped": torch.tensor(3)}
    save_file(tensors, tmp_path / "old.safetensors")
    (tmp_path / "old.json").write_text(json.dumps({"prompts": fresh.prompts, "categories": fresh.categories,
                                                   "source": {"data": "items"}}))
    with pytest.raises(APTPError, match="old.safetensors is an encoded dataset in the single-file format"):
        EncodedCache(tmp_path / "old", "aptp assign")
    vae, prompts = VAE(), Prompts()
    encode(tmp_path / "old", vae, prompts)
    assert vae.calls == prompts.calls == 0
    assert shard_bytes(tmp_path / "old") == shard_bytes(tmp_path / "fresh")
    assert not (tmp_path / "old.safetensors").exists() and not (tmp_path / "old.json").exists()


@pytest.mark.slow  # two fresh interpreters importing torch and diffusers
def test_bench_cache_memory_reads_the_caches_in_fresh_processes(tmp_path, capsys):
    from aptp.cli import main

    assert main(["bench", "cache-memory", "--sizes", "16", "40", "--steps", "3", "--batch", "4", "--conditioning",
                 "world", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "32x384 fp16 conditioning" in lines[0] and "positioned reads" in lines[0]
    assert [line.split()[:2] for line in lines[2:4]] == [["16", "17"], ["40", "41"]]
    assert lines[-1].startswith("  target: peak at 40 records <= 1.15 x peak at 16")
    assert EncodedCache(tmp_path / "world-40").rows("conditioning.encoder_hidden_states", [40]).shape == (1, 32, 384)
