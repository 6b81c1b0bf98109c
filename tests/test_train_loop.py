"""The training loop on the tiny preset: schedule facts, learning, exact resume, checkpoints,
signals, the latent cache, torchrun/DDP, and loading the exported student into the pipeline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image
from safetensors.torch import load_file

from moebius.train import checkpoint as ckpt
from moebius.train import loop, networks
from moebius.train.config import load_config
from moebius.train.data import write_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.json"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The real photos of ../shared/data/photos with their object masks."""
    photos = shared_path("data", "photos")
    path = tmp_path_factory.mktemp("data") / "photos.jsonl"
    write_manifest(photos, path, photos)
    return path


def tiny(manifest, *overrides):
    sets = [f"data.manifest={manifest}", "run.progress=false", "data.num_workers=0", *overrides]
    return load_config(TINY, sets)


# ------------------------------------------------------------------------------ schedule facts
def test_ddpm_schedule_is_the_spec():
    abar = loop.make_noise_scheduler().alphas_cumprod
    assert [round(float(abar[t]), 5) for t in (0, 500, 999)] == [0.99915, 0.27633, 0.00466]


def test_logit_normal_timesteps():
    t = loop.logit_normal_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    p = lambda m: float(m.float().mean())  # noqa: E731
    assert abs(p(t < 100) - 0.014) < 0.002 and abs(p(t < 300) - 0.198) < 0.004
    assert abs(p(t >= 900) - 0.014) < 0.002 and abs(p(t >= 950) - 0.0016) < 0.0005


def test_gradient_checkpointing_same_grads_and_batchnorm_updates_once():
    from moebius.models import MoebiusConfig, MoebiusUNet

    torch.manual_seed(0)
    plain = MoebiusUNet(MoebiusConfig.tiny()).train()
    ckpted = MoebiusUNet(MoebiusConfig.tiny()).train()
    ckpted.load_state_dict(plain.state_dict())
    networks.enable_gradient_checkpointing(ckpted)
    assert ckpted.state_dict().keys() == plain.state_dict().keys()
    x, ids = torch.randn(2, 9, 16, 16), torch.tensor([list(range(10))] * 2)
    for model in (plain, ckpted):
        loss = model(x, torch.tensor([10, 900]), ids).square().mean()
        # a partial backward first (as the gradient-norm weights do): a second recompute
        torch.autograd.grad(loss, model.diff_model.conv_out.conv_pw.weight, retain_graph=True)
        loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpted.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpted.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # running stats: one update, not two


# ------------------------------------------------------------------------------ running
def test_short_run_learns_and_exports_a_loadable_pipeline(manifest, tmp_path):
    """The CI version of bench/train_curve.py: the output-KD loss falls within 30 steps."""
    run = tmp_path / "run"
    final = loop.train(tiny(manifest, "run.max_steps=30", "run.save_every=15"), run)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(loop.METRIC_KEYS) <= set(rows[0])
    first = np.mean([r["loss_output_kd"] for r in rows[:5]])
    last = np.mean([r["loss_output_kd"] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert json.loads((run / "config.json").read_text())["run"]["max_steps"] == 30
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step-00000015", "step-00000030"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    _check_final(final, run / "checkpoints" / "step-00000030")
    from moebius.cli import main

    photos = shared_path("data", "photos")
    out = tmp_path / "out.png"
    argv = ["inpaint", str(photos / "skimage_coffee.png"), str(photos / "skimage_coffee_mask.png"),
            "-o", str(out), "--weights", str(final), "--steps", "2", "-q"]  # fmt: skip
    assert main(argv) == 0 and Image.open(out).size == Image.open(argv[1]).size


def _check_final(final: Path, checkpoint: Path):
    """final/ = the checkpoint's student, in both layouts, and it inpaints through the pipeline."""
    from moebius.models.checkpoints import load_state_dict_file
    from moebius.pipeline import InpaintPipeline

    trained = load_file(str(checkpoint / ckpt.MODEL_FILE))
    for name in ("model.safetensors", "diffusion_pytorch_model.bin"):
        saved = load_state_dict_file(final / "unet" / name)
        assert saved.keys() == trained.keys() and not any(k.startswith("module.") for k in saved)
        assert all(torch.equal(saved[k], trained[k]) for k in saved)
    pipe = InpaintPipeline.from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8))
    hole = np.zeros((128, 128), bool)
    hole[40:80, 40:80] = True
    out = pipe(image, hole, steps=2, generator=torch.Generator().manual_seed(0))
    a, b = np.asarray(out, np.int16), np.asarray(image, np.int16)
    assert out.size == (128, 128) and np.abs(a - b)[hole].mean() > 1  # the hole was filled


def test_finetune_from_released_weights_without_teacher(manifest, tmp_path):
    """finetune: starts from a released-layout .bin; teacher-free: task only, KD terms null."""
    from moebius.models import MoebiusConfig, MoebiusUNet
    from moebius.models.checkpoints import save_original

    torch.manual_seed(123)
    released = MoebiusUNet(MoebiusConfig.tiny())
    save_original(released, tmp_path / "released.bin")
    run = tmp_path / "run"
    sets = ["run.mode=finetune", f"model.student_weights={tmp_path / 'released.bin'}",
            "model.teacher=null", "loss.output_kd=false", "loss.feature_kd=false",
            "loss.task=true", "optim.lr=0", "run.max_steps=2"]  # fmt: skip
    loop.train(tiny(manifest, *sets), run)
    rows = metrics(run)
    assert all(r["loss_task"] > 0 and r["loss_output_kd"] is None for r in rows)
    assert all(r["loss_feature_kd"] is None and r["weight_output_kd"] is None for r in rows)
    final = load_file(str(run / "final/unet/model.safetensors"))
    for name, param in released.named_parameters():  # lr 0: the loaded weights, unchanged
        assert torch.equal(final[name], param.detach()), name


def test_resume_continues_exactly(manifest, tmp_path):
    """N straight steps == N/2 steps, stop, --resume, N/2 more: metrics and weights identical."""
    n = 6
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the original recipe's loss (task + both KD terms, gradient-norm weights), EMA on, and a
    # batch size that does not divide the 10 photos, so the data position crosses an epoch
    recipe = ["loss.task=true", "loss.adaptive=true", "loss.kd_weight=0.01", "optim.ema=true",
              "run.batch_size=3", "run.save_every=2"]  # fmt: skip
    loop.train(tiny(manifest, f"run.max_steps={n}", *recipe), straight)
    loop.train(tiny(manifest, f"run.max_steps={n // 2}", *recipe), split)
    loop.train(tiny(manifest, f"run.max_steps={n}", *recipe), split, resume=True)
    rows = metrics(split)
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert rows == metrics(straight)  # every value of the resumed steps, bit for bit
    assert all(r["weight_output_kd"] is not None and r["weight_feature"] for r in rows)
    a = load_file(str(straight / "final/unet/model.safetensors"))  # the EMA weights
    b = load_file(str(split / "final/unet/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_that_resumes(manifest, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moebius", "train", str(TINY), "--output-dir", str(run),
           "--max-steps", "1000", "--set", f"data.manifest={manifest}", "--set",
           "run.progress=false", "--set", "data.num_workers=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out
    latest = ckpt.latest_checkpoint(run)
    step = torch.load(latest / ckpt.STATE_FILE, weights_only=True)["step"]
    assert step >= 2 and step == metrics(run)[-1]["step"] and not (run / "final").exists()
    loop.train(tiny(manifest, f"run.max_steps={step + 1}"), run, resume=True)
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 2))
    assert (run / "final" / "unet" / "model.safetensors").is_file()


def test_latent_cache_trains_without_the_encoder(manifest, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from moebius.cli import main

    cache = tmp_path / "cache"
    assert main(["train", "cache-latents", str(manifest), "--vae", "tiny", "--out", str(cache),
                 "--variants", "2", "--config", str(TINY)]) == 0  # fmt: skip
    row = load_file(str(cache / "row-000000.safetensors"))
    assert row["latent_mean"].shape == (2, 4, 16, 16) == row["masked_latent_logvar"].shape
    assert row["latent_mask"].shape == (2, 1, 16, 16) and row["input_ids"].shape == (2, 10)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran although a latent cache is used")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    run = tmp_path / "run"
    loop.train(tiny(manifest, f"data.latent_cache={cache}", "run.max_steps=3"), run)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_torchrun_two_processes_gloo(manifest, tmp_path):
    """2 ranks (DDP, gloo): a few steps, rank 0 alone writes; final/ inpaints in one process.

    The recipe's gradient-norm weights are on: their extra autograd.grad calls run under DDP.
    """
    run = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "moebius", "train",
           str(TINY), "--output-dir", str(run), "--max-steps", "3", "--set",
           f"data.manifest={manifest}", "--set", "run.progress=false", "--set",
           "data.num_workers=0", "--set", "run.batch_size=2", "--set", "loss.task=true",
           "--set", "loss.adaptive=true"]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]  # one writer, not two
    assert done.stdout.count("resolved config") == 1
    state = torch.load(run / "checkpoints/step-00000003" / ckpt.STATE_FILE, weights_only=True)
    assert len(state["rng"]) == 2 and len(state["data"]) == 2  # every rank's stream
    _check_final(run / "final", run / "checkpoints/step-00000003")


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    from moebius.cli import main

    out = str(tmp_path / "run")
    assert main(["train", str(TINY), "--output-dir", out, "--set", "run.batchsize=3"]) == 2
    assert "unknown config key(s) ['run.batchsize']" in capsys.readouterr().err
    assert main(["train", str(TINY), "--output-dir", out]) == 2
    assert "no training data: set data.manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg"}\n')
    # the image is read in a DataLoader worker: the error still names the file, in one line
    argv = ["train", str(TINY), "--output-dir", out, "--set", f"data.manifest={bad}",
            "--set", "run.progress=false", "--set", "data.num_workers=1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot read image file") and "missing.jpg" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_skip_unreadable_logs_and_trains_on_the_rest(manifest, tmp_path, caplog):
    rows = manifest.read_text().splitlines()[:2]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([rows[0], '{"image": "gone.jpg"}', rows[1]]) + "\n")
    run = tmp_path / "run"
    sets = [f"data.manifest={mixed}", "data.skip_unreadable=true", "run.batch_size=1",
            "run.max_steps=3"]  # fmt: skip
    loop.train(tiny(manifest, *sets), run)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]  # whole-skipped batches are no step
    assert "gone.jpg" in caplog.text and "skipping unreadable row 1" in caplog.text
