"""`python -m moebius` under bad input, wrong options and interrupts, run as a user runs it.

Each test starts the real command in a subprocess (tiny random weights saved with
save_pretrained) and checks the exit status, that stderr holds no traceback but the words that
explain, and that no input changed by a single byte and no partial output was left behind.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline, tiny_vae_model
from PIL import Image

from moebius.cli import main
from moebius.models import checkpoints

STEPS = ["--steps", "2", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("weights"))


def moebius(*args, cwd: Path, env: dict | None = None, prefix=(), timeout: float = 300):
    """Run `python -m moebius ARGS` offline (and without MOEBIUS_DEBUG unless `env` sets it)."""
    base = {k: v for k, v in os.environ.items() if k != "MOEBIUS_DEBUG"}
    env = {**base, "HF_HUB_OFFLINE": "1", **(env or {})}
    argv = [*prefix, sys.executable, "-m", "moebius", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def error_line(proc) -> str:
    """The one `error:` line of a failed run (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def photo(side_w: int = 160, side_h: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 200, side_w, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 40, (side_h, side_w, 3))
    return Image.fromarray((smooth + noise).astype(np.uint8))


def write_pair(folder: Path, name: str, image: Image.Image | None = None, **save) -> None:
    """NAME.ext and NAME_mask.png (a 40 x 30 hole) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    image = image or photo()
    image.save(folder / name, **save)
    mask = np.zeros((image.size[1], image.size[0]), np.uint8)
    mask[40:70, 50:90] = 255
    Image.fromarray(mask).save(folder / f"{Path(name).stem}_mask.png")


# ------------------------------------------------------------------ outputs never touch inputs
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["d", "d", "-o", "d", "--overwrite"], "is the input folder"),
        (["d", "d", "-o", "d"], "is the input folder"),
        (["d", "m", "-o", "m", "--overwrite"], "is the input folder"),
        (["d/a.png", "d/a_mask.png", "-o", "d/a_mask.png", "--overwrite"], "is the input mask"),
        (["d/a.png", "d/a_mask.png", "-o", "d/a.png", "--overwrite"], "is the input image"),
        (["d/a.png", "m/a.png", "-o", "d", "--overwrite"], "is the input image"),
        (["d/a.png", "m/a.png", "-o", "link.png", "--overwrite"], "is the input image"),
        (["d", "m", "-o", "m", "--suffix", "_mask", "--overwrite"], "is the input mask"),
    ],
)
def test_an_output_over_an_input_is_refused_before_any_work(weights, tmp_path, args, words):
    write_pair(tmp_path / "d", "a.png")
    write_pair(tmp_path / "d", "b.png", photo(seed=1))
    (tmp_path / "m").mkdir()
    shutil.copy(tmp_path / "d" / "a_mask.png", tmp_path / "m" / "a.png")  # a's mask as m/a.png
    shutil.copy(tmp_path / "d" / "b_mask.png", tmp_path / "m" / "b_mask.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "d" / "a.png")
    before = snapshot(tmp_path)
    # Broken weights prove the refusal comes first: no weights are even looked at.
    proc = moebius("inpaint", *args, "--weights", "nowhere/at_all", *STEPS, cwd=tmp_path)
    assert proc.returncode == 2 and words in error_line(proc)
    assert "--overwrite" in proc.stderr or "--suffix" in proc.stderr  # says what to do
    assert snapshot(tmp_path) == before  # byte for byte, and nothing new


def test_same_folder_with_a_suffix_never_reads_its_own_results(weights, tmp_path):
    """Results beside the inputs with --suffix; a rerun never takes them as inputs. 16-bit RGB
    is read as 8 bits per channel, with a warning (documented)."""
    d = tmp_path / "d"
    write_pair(d, "a.png")
    write_pair(d, "c.jpg", photo(seed=2), quality=95)
    deep = (np.asarray(photo(seed=3)).astype(np.uint16) * 257 + 3).astype(">u2")  # 16 bits
    write_png16_rgb(d / "deep.png", deep)
    shutil.copy(d / "a_mask.png", d / "deep_mask.png")
    inputs = snapshot(d)
    args = ["inpaint", d, d, "-o", d, "--suffix", "_out", "--weights", weights, *STEPS]
    proc = moebius(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "3 done, 0 skipped, 0 failed" in proc.stderr
    assert "deep.png: 16-bit RGB is read as 8 bits per channel" in proc.stderr
    results = {"a_out.png", "c_out.png", "deep_out.png"}
    assert set(snapshot(d)) == set(inputs) | results
    assert {k: v for k, v in snapshot(d).items() if k in inputs} == inputs
    out = np.asarray(Image.open(d / "deep_out.png"))
    assert out.dtype == np.uint8 and out.shape == deep.shape
    assert np.array_equal(out[:20], (deep[:20] >> 8).astype(np.uint8))  # far from the hole
    after_first = snapshot(d)
    proc = moebius(*args, cwd=tmp_path)  # all skipped: a result read as input would be "done"
    assert proc.returncode == 0 and "0 done, 3 skipped, 0 failed" in proc.stderr
    assert snapshot(d) == after_first


def write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): big-endian rows, filter 0."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = [png_chunk(b"IHDR", header), png_chunk(b"IDAT", zlib.compress(raw))]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b""))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(weights, tmp_path):
    """A read-only folder. Root writes anywhere, so root runs the command without the
    capability to override file permissions (setpriv)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no folder refuses root's writes")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    write_pair(tmp_path / "d", "a.png")
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    before = snapshot(tmp_path)
    proc = moebius("inpaint", "d", "d", "-o", out, "--weights", weights, *STEPS, cwd=tmp_path,
                   prefix=prefix)  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2 and f"cannot write results into {out}" in line
    assert "Permission denied" in line and "loaded" not in proc.stderr
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------- options checked up front
@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--steps", "0", "integer >= 1"),
        ("--steps", "-1", "integer >= 1"),
        ("--strength", "2", "(0, 1]"),
        ("--batch-size", "0", "integer >= 1"),
        ("--dilate", "-3", "integer >= 0"),
        ("--margin", "-1", "integer >= 0"),
        ("--guidance", "nan", "finite"),
        ("--guidance", "inf", "finite"),
        ("--noise-offset", "nan", "finite"),
        ("--max-pixels", "0", "integer >= 1"),
        ("--device", "gpu", "cpu, cuda"),
    ],
)
def test_bad_options_exit_2_in_one_line_before_torch(tmp_path, flag, value, words):
    write_pair(tmp_path / "d", "a.png")
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "moebius", "inpaint", "d/a.png",
         "d/a_mask.png", "-o", "out.png", flag, value],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    imported = set(re.findall(r"^import time:.*\|\s*(\S+)$", proc.stderr, re.M))
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if "import time" not in line)
    line = error_line(proc)
    assert proc.returncode == 2 and flag in line and words in line and value in line
    assert "moebius.options" in imported and "torch" not in imported
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_device_cuda_without_a_gpu(weights, tmp_path):
    write_pair(tmp_path / "d", "a.png")
    before = snapshot(tmp_path)
    proc = moebius("inpaint", "d/a.png", "d/a_mask.png", "-o", "out.png", "--weights", weights,
                   "--device", "cuda", cwd=tmp_path)  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2 and "--device cuda" in line and "--device cpu" in line
    assert ("without CUDA" if torch.version.cuda is None else "no CUDA GPU") in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- weights that cannot be used
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Payload:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_vae(folder: Path) -> None:
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": Payload(folder / "EXECUTED")}, folder / "vae" / "diffusion_pytorch_model.bin")


def _other_vae(folder: Path) -> None:
    """vae/ weights of another architecture beside the original config.json."""
    other = tiny_vae_model(levels=3)
    other.save_pretrained(folder / "other", safe_serialization=True)
    shutil.copy(folder / "other" / "diffusion_pytorch_model.safetensors", folder / "vae")


BROKEN = {
    "empty unet": (lambda f: (f / "unet/model.safetensors").write_bytes(b""),
                   ["unet/model.safetensors", "empty"]),
    "truncated unet": (lambda f: _truncate(f / "unet/model.safetensors"),
                       ["unet/model.safetensors", "truncated or corrupt", "download or save"]),
    "garbage unet": (lambda f: (f / "unet/model.safetensors").write_bytes(os.urandom(4096)),
                     ["unet/model.safetensors", "truncated or corrupt"]),
    "bad config json": (lambda f: (f / "unet/config.json").write_text('{"model_type": "moeb'),
                        ["unet/config.json", "not valid JSON"]),
    "truncated vae": (lambda f: _truncate(f / "vae/diffusion_pytorch_model.safetensors"),
                      ["vae/diffusion_pytorch_model.safetensors", "truncated or corrupt"]),
    "pickled vae": (_pickled_vae, ["vae/diffusion_pytorch_model.bin", "pickled Python objects"]),
    "missing vae weights": (lambda f: (f / "vae/diffusion_pytorch_model.safetensors").unlink(),
                            ["not a complete", "vae/diffusion_pytorch_model.safetensors"]),
    "vae of another layout": (_other_vae, ["vae/diffusion_pytorch_model.safetensors",
                                           "does not fit", "vae/config.json"]),
}  # fmt: skip


# Four cases through a subprocess, the others through main() in this process (same code path,
# without paying for another torch import on a loaded machine).
IN_A_SUBPROCESS = ("truncated unet", "bad config json", "truncated vae", "pickled vae")


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_weights_are_one_line_naming_the_file(weights, tmp_path, case, capsys):
    folder = shutil.copytree(weights, tmp_path / "w")
    damage, words = BROKEN[case]
    damage(folder)
    write_pair(tmp_path / "d", "a.png")
    before = snapshot(tmp_path)
    args = ["inpaint", tmp_path / "d/a.png", tmp_path / "d/a_mask.png", "-o",
            tmp_path / "out.png", "--weights", folder, *STEPS]  # fmt: skip
    if case in IN_A_SUBPROCESS:
        proc = moebius(*args, cwd=tmp_path)
    else:
        code = main(list(map(str, args)))
        proc = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    line = error_line(proc)
    assert proc.returncode == 2 and all(w in line for w in words), line
    assert snapshot(tmp_path) == before and not (folder / "EXECUTED").exists()


def test_a_bare_weights_name_that_is_no_folder(tmp_path):
    write_pair(tmp_path / "d", "a.png")
    proc = moebius("inpaint", "d/a.png", "d/a_mask.png", "-o", "out.png", "--weights",
                   "nonexistent_dir", cwd=tmp_path)  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2 and "no weights folder named 'nonexistent_dir' exists" in line
    assert "hub repo" in line and "owner/name" in line and not (tmp_path / "out.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    write_pair(tmp_path / "d", "a.png")
    args = ["inpaint", "d/a.png", "d/a_mask.png", "-o", "out.png", "--weights", "nope"]
    for extra, env in (([], {"MOEBIUS_DEBUG": "1"}), (["--debug"], {})):
        proc = moebius(*args, *extra, cwd=tmp_path, env=env)
        assert (
            proc.returncode == 2
            and "Traceback" in proc.stderr
            and "WeightsNotFoundError" in proc.stderr
        )
        assert proc.stderr.rstrip().splitlines()[-1].startswith("error: no weights folder")


# ------------------------------------------------------------------------------------ convert
ORIGINAL_TINY = {"data": {"image_size": 128}, "vae": {"downsample_ratio": 8},
                 "model": {"block_out_channels": [16, 32, 64], "attention_head_dim": 4,
                           "cross_attention_dim": 32, "encoder_hid_dim": 32,
                           "norm_num_groups": 8}}  # fmt: skip


def test_convert_failures_leave_nothing_behind(weights, tmp_path):
    unet = checkpoints.load_pretrained(weights / "unet")
    checkpoints.save_original(unet, tmp_path / "good.bin")
    (tmp_path / "cfg.json").write_text(json.dumps({"config": ORIGINAL_TINY}))
    broken_vae = shutil.copytree(weights / "vae", tmp_path / "broken_vae")
    _truncate(broken_vae / "diffusion_pytorch_model.safetensors")
    before = snapshot(tmp_path)
    cases = [
        (["missing.bin", "out"], "missing.bin does not exist"),
        (["good.bin", "out", "--config", "cfg.json", "--vae", "/nonexistent"],
         "--vae /nonexistent is not a VAE folder"),
        (["good.bin", "out", "--config", "cfg.json", "--vae", "broken_vae"],
         "broken_vae/diffusion_pytorch_model.safetensors"),
    ]  # fmt: skip
    for args, words in cases:
        proc = moebius("convert", *args, cwd=tmp_path)
        assert proc.returncode == 2 and words in error_line(proc)
        assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(
            ["good.bin", "cfg.json", "broken_vae"]
        )  # no out/, no hidden .out.*.part/


# ------------------------------------------------------------------------------ large images
def test_a_huge_header_is_too_large_not_corrupt(weights, tmp_path):
    """A 60-byte PNG whose header says 30000 x 30000 (900 MP): refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                                       + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                                       + png_chunk(b"IEND", b""))  # fmt: skip
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    before = snapshot(tmp_path)
    proc = moebius("inpaint", "big.png", "mask.png", "-o", "out.png", "--weights", weights,
                   *STEPS, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "too large (30000x30000" in proc.stderr and "not corrupt" in proc.stderr
    assert "--max-pixels" in proc.stderr and "0 done, 0 skipped, 1 failed" in proc.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- interrupts
def _start(args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "moebius", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _interrupt_after(proc, out: Path, count: int, sig: int) -> tuple[int, str]:
    """Send `sig` once `out` holds `count` results; (exit status, stderr)."""
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < count and proc.poll() is None:
        assert time.monotonic() < deadline, "no result appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def test_interrupt_in_the_middle_of_a_folder(weights, tmp_path):
    """SIGINT, then SIGTERM on the rerun: exit 130, summary, no traceback, no partial file;
    a last rerun does the rest."""
    src, out, n = tmp_path / "d", tmp_path / "out", 8
    for i in range(n):
        write_pair(src, f"{i}.png", photo(128, 128, seed=i))
    before = snapshot(src)
    args = ["inpaint", src, src, "-o", out, "--weights", weights, "--steps", "40", "--device",
            "cpu", "-q"]  # fmt: skip
    finished = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, stderr = _interrupt_after(_start(args, tmp_path), out, finished + 1, sig)
        written = sorted(p.name for p in out.iterdir())
        assert code == 130 and "Traceback" not in stderr, stderr
        assert all(name.endswith(".png") and not name.startswith(".") for name in written)
        assert finished < len(written) < n  # stopped in the middle
        done = re.search(
            r"interrupted: (\d+) done, (\d+) skipped, 0 failed, (\d+) not done", stderr
        )
        assert done, stderr
        assert int(done[1]) == len(written) - finished and int(done[2]) == finished
        assert int(done[3]) == n - len(written) and "Run the same command again" in stderr
        finished = len(written)
    proc = moebius(*args, cwd=tmp_path)
    assert proc.returncode == 0 and f"{n - finished} done, {finished} skipped" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in range(n))
    assert snapshot(src) == before


def test_load_image_limit_replaces_pils_bomb_check(tmp_path):
    """Above PIL's 89 MP warning but under our limit: no warning; the limit is ours to set."""
    import warnings

    from moebius.images import ImageError, ImageTooLargeError, load_image

    Image.new("L", (9500, 9500), 7).save(tmp_path / "big.png", compress_level=1)  # 90.25 MP
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        image = load_image(tmp_path / "big.png")
    assert image.size == (9500, 9500) and image.getpixel((9499, 9499)) == 7
    with pytest.raises(ImageTooLargeError, match=r"too large \(9500x9500 = 90,250,000 pixels"):
        load_image(tmp_path / "big.png", max_pixels=90_249_999)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own setting is left as it was
    header = struct.pack(">IIBBBBB", 4000, 3000, 8, 2, 0, 0, 0)  # 12 MP, 64 bytes of data
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                                        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                                        + png_chunk(b"IEND", b""))  # fmt: skip
    with pytest.raises(ImageTooLargeError, match="4000x3000"):
        load_image(tmp_path / "fake.png", max_pixels=10_000_000)
    with pytest.raises(ImageError, match="corrupt, truncated") as info:  # no limit: decoding fails
        load_image(tmp_path / "fake.png", max_pixels=None)
    assert not isinstance(info.value, ImageTooLargeError)
