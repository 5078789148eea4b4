"""Checkpoints (safetensors + JSON, atomic, exact optimizer state) and config overrides."""

import os
import signal

import pytest
import torch

from aptp.config import parse_overrides
from aptp.config import config_from_dict
from aptp.teacher.train import UNetTrainConfig
from aptp.training.common import batch_index, run_loop
from aptp.training import checkpoint as checkpoints
from aptp.training.checkpoint import resume_checkpoint, save_checkpoint
from aptp.utils import APTPError


def _trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _step(model, optimizer, seed):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_checkpoint_resumes_exactly(tmp_path):
    straight, straight_opt = _trained()
    for step in range(4):
        _step(straight, straight_opt, step)

    first, first_opt = _trained()
    for step in range(2):
        _step(first, first_opt, step)
    save_checkpoint(tmp_path / "ckpt", {"model": first}, {"step": 2}, first_opt)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]

    resumed, resumed_opt = _trained(seed=1)  # different init: everything must come from the checkpoint
    _, state = resume_checkpoint(tmp_path / "ckpt", {"model": resumed}, resumed_opt)
    for step in range(state["step"], 4):
        _step(resumed, resumed_opt, step)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_interrupted_swaps_leave_a_usable_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _trained()
    save_checkpoint(tmp_path / "ckpt", {"model": model}, {"step": 1}, optimizer)
    # A crash between the two renames leaves only the previous checkpoint, as ckpt.old.
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    assert resume_checkpoint(tmp_path / "ckpt", {"model": model}, optimizer) == (tmp_path / "ckpt.old", {"step": 1})
    assert resume_checkpoint(tmp_path / "nothing", {"model": model}, optimizer) is None
    # A second crash in the next swap, before the new checkpoint is in place, must not lose ckpt.old.
    real_rename = type(tmp_path).rename

    def crash(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(tmp_path), "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", {"model": model}, {"step": 2}, optimizer)
    monkeypatch.undo()
    assert resume_checkpoint(tmp_path / "ckpt", {"model": model}, optimizer) == (tmp_path / "ckpt.old", {"step": 1})
    save_checkpoint(tmp_path / "ckpt", {"model": model}, {"step": 2}, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_stops_with_its_path(tmp_path, capsys):
    model, optimizer = _trained()
    save_checkpoint(tmp_path / "ckpt", {"model": model}, {"step": 1}, optimizer)
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    save_checkpoint(tmp_path / "ckpt.new", {"model": model}, {"step": 2}, optimizer)
    (tmp_path / "ckpt.new").rename(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated by a full disk
    assert resume_checkpoint(tmp_path / "ckpt", {"model": model}, optimizer)[1] == {"step": 1}
    assert "cannot be read" in capsys.readouterr().out
    (tmp_path / "ckpt.old" / checkpoints.STATE_FILE).write_text("{not json")
    with pytest.raises(APTPError, match="no readable checkpoint in .*ckpt, .*ckpt.old"):
        resume_checkpoint(tmp_path / "ckpt", {"model": model}, optimizer)


def _interrupting_loop(tmp_path, interrupts_at: dict[int, int]):
    saved = []

    def step_fn(step):
        for _ in range(interrupts_at.get(step, 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    with pytest.raises(APTPError) as error:
        run_loop(10, 0, step_fn, saved.append, 4, tmp_path / "ckpt", "test", show=False)
    return str(error.value), saved


def test_ctrl_c_stops_between_steps_and_a_second_one_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a job started in the background
    message, saved = _interrupting_loop(tmp_path, {5: 1})
    assert saved == [4, 6] and message.startswith("interrupted at step 6; checkpoint saved")
    message, saved = _interrupting_loop(tmp_path, {5: 2})
    assert saved == [4] and message.startswith("interrupted during step 6; the last checkpoint (step 4)")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_batches_cover_each_epoch_once():
    size, batch = 10, 4
    indices = torch.cat([batch_index(step, batch, size, 3, 0, 1) for step in range(5)])
    assert sorted(indices[:10].tolist()) == list(range(10))
    assert sorted(indices[10:20].tolist()) == list(range(10))
    assert not torch.equal(indices[:10], indices[10:20])  # reshuffled every epoch
    assert torch.equal(batch_index(2, batch, size, 3, 0, 1), indices[8:12])


def test_overrides_are_typed_and_unknown_keys_rejected():
    overrides = parse_overrides(["steps=10", "lr=3e-4", "block-out-channels=[32, 64, 64]"])
    config = config_from_dict(UNetTrainConfig, overrides)
    assert (config.steps, config.lr, list(config.block_out_channels)) == (10, 3e-4, [32, 64, 64])
    with pytest.raises(APTPError, match="unknown UNetTrainConfig option"):
        config_from_dict(UNetTrainConfig, {"stepz": 3})
    with pytest.raises(APTPError, match="key=value"):
        parse_overrides(["steps"])


def test_category_weights_set_each_category_share_of_a_batch():
    from aptp.teacher.train import _row_weights

    categories = ["single"] * 60 + ["text"] * 20 + ["two"] * 20
    weights = _row_weights(categories, {"text": 2.0})
    shares = {c: float(sum(w for w, k in zip(weights, categories) if k == c) / weights.sum()) for c in set(categories)}
    assert shares == pytest.approx({"single": 0.25, "two": 0.25, "text": 0.5})
    assert _row_weights(categories, None) is None
    with pytest.raises(APTPError, match="unknown categories"):
        UNetTrainConfig(category_weights={"glyphs": 2})
    with pytest.raises(APTPError, match="no category"):
        _row_weights(categories, {"single": 0, "text": 0, "two": 0})


def test_block_distillation_normalised_per_block_by_the_teacher_energy():
    from aptp.training.common import block_distillation

    teacher = {"small": torch.full((2, 3), 0.1), "large": torch.full((2, 3), 10.0)}
    student = {"small": torch.full((2, 3), 0.2), "large": torch.full((2, 3), 11.0)}
    raw = block_distillation(student, teacher, normalize=False)
    assert raw.item() == pytest.approx((0.01 + 1.0) / 2)
    normalised = block_distillation(student, teacher, normalize=True)
    assert normalised.item() == pytest.approx((0.01 / 0.01 + 1.0 / 100.0) / 2)


@pytest.mark.parametrize("overrides, message", [
    ({"budget": "abc"}, "'budget' must be float"),
    ({"num_codes": 2.5}, "'num_codes' must be int"),
    ({"num_codes": True}, "'num_codes' must be int"),
    ({"min_width": 0.5}, "'min_width' must be dict or None"),
    ({"normalize_blocks": "yes"}, "'normalize_blocks' must be bool"),
])
def test_options_of_the_wrong_type_are_one_line_errors(overrides, message):
    from aptp.training.prune import PruneConfig

    with pytest.raises(APTPError, match=message):
        config_from_dict(PruneConfig, overrides)


def test_options_widen_ints_to_floats_and_lists_to_tuples():
    from aptp.training.prune import PruneConfig

    config = config_from_dict(PruneConfig, {"budget": 1, "min_snr_gamma": None})
    assert config.budget == 1.0 and isinstance(config.budget, float) and config.min_snr_gamma is None
    assert config_from_dict(UNetTrainConfig, {"block_out_channels": [32, 64]}).block_out_channels == (32, 64)


def test_saved_folders_are_atomic_and_get_ordinary_file_modes(tmp_path):
    from safetensors.torch import save_file

    from aptp.utils import atomic_folder

    mask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as folder:
            save_file({"w": torch.zeros(2)}, folder / "weights.safetensors")  # safetensors writes 0600
        assert (tmp_path / "model" / "weights.safetensors").stat().st_mode & 0o777 == 0o644
        with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as folder:
            (folder / "half.json").write_text("{")
            raise RuntimeError("disk full")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old folder, whole; no .tmp
        assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["weights.safetensors"]
        model, optimizer = _trained()
        save_checkpoint(tmp_path / "ckpt", {"model": model}, {"step": 1}, optimizer)
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()} == {0o644}
    finally:
        os.umask(mask)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_those_of_diffusers_training_scripts(prediction_type):
    from diffusers import DDPMScheduler

    from aptp.training.common import snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    # epsilon: min(SNR, 5) / SNR; v-prediction: min(SNR, 5) / (SNR + 1), which is min(SNR, 5) / SNR * (1 - alpha).
    expected = snr.clamp(max=5) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = snr_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=0)
    assert weights[-1] < 1 if prediction_type == "v_prediction" else weights[-1] == pytest.approx(1.0)
    assert snr_weights(scheduler, timesteps, None) is None
