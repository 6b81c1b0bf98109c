"""`moebius eval score` / `report`: PSNR and SSIM vs scikit-image on the real photos, FID vs
scipy, LPIPS and FID end to end with random backbones saved in the real weight-file layouts."""

import csv
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import shared_path
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from moebius.cli import main
from moebius.eval import networks
from moebius.eval.metrics import frechet_distance, inception_discriminative_scores
from moebius.eval.predict import classical_fill
from moebius.eval.report import markdown_table
from moebius.eval.score import bin_name

PLACES = ("data", "places2_512")


def score(*args) -> int:
    return main(["eval", "score", "-q", *map(str, args)])


def read_csv(path):
    with open(path) as f:
        return {row["name"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def places_telea(tmp_path_factory):
    """Telea predictions of 8 real Places2 photos (6 square, 2 non-square) with their own masks."""
    src = shared_path(*PLACES)
    gt, pred = tmp_path_factory.mktemp("gt"), tmp_path_factory.mktemp("pred")
    names = sorted(p.stem for p in src.glob("freeform_*.png") if "_mask" not in p.stem)[:6]
    names += ["object_01", "object_16"]
    for name in names:
        image = np.asarray(Image.open(src / f"{name}.png").convert("RGB"))
        hole = np.asarray(Image.open(src / f"{name}_mask.png")) == 255
        Image.fromarray(image).save(gt / f"{name}.png")
        Image.open(src / f"{name}_mask.png").save(gt / f"{name}_mask.png")
        Image.fromarray(classical_fill("telea", image, hole)).save(pred / f"{name}.png")
    return gt, pred, names


def test_psnr_ssim_agree_with_scikit_image_on_real_photos(places_telea, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    gt, pred, names = places_telea
    assert score("--pred", pred, "--gt", gt, "--masks", gt, "--out", tmp_path / "r.json") == 0
    results, rows = json.loads((tmp_path / "r.json").read_text()), read_csv(tmp_path / "r.csv")
    assert sorted(rows) == sorted(names) and results["count"] == 8
    psnrs, ssims, fractions = [], [], []
    for name in names:
        g = np.asarray(Image.open(gt / f"{name}.png"))
        p = np.asarray(Image.open(pred / f"{name}.png"))
        psnr = peak_signal_noise_ratio(g, p, data_range=255)
        mse = np.mean((g.astype(np.float64) - p) ** 2)
        assert psnr == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)
        ssim = structural_similarity(
            g, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=-1,
        )  # fmt: skip
        assert abs(float(rows[name]["psnr"]) - psnr) < 1e-4
        assert abs(float(rows[name]["ssim"]) - ssim) < 1e-4
        psnrs.append(psnr), ssims.append(ssim)
        fractions.append((np.asarray(Image.open(gt / f"{name}_mask.png")) == 255).mean())
        assert float(rows[name]["hole_fraction"]) == pytest.approx(fractions[-1])
    assert abs(results["overall"]["psnr"] - np.mean(psnrs)) < 1e-4
    assert abs(results["overall"]["ssim"] - np.mean(ssims)) < 1e-4
    assert 15 < results["overall"]["psnr"] < 30 and 0.3 < results["overall"]["ssim"] < 0.95
    assert "lpips" not in results["overall"] and "fid" not in results["overall"]
    # per hole-area bin: counts from the masks, metric = mean over the bin's images
    expected = {}
    for fraction, value in zip(fractions, psnrs, strict=True):
        expected.setdefault(bin_name(fraction), []).append(value)
    assert {k: v["count"] for k, v in results["bins"].items()} == {
        k: len(v) for k, v in expected.items()
    }
    for key, values in expected.items():
        assert abs(results["bins"][key]["psnr"] - np.mean(values)) < 1e-4


def test_missing_weights_skip_with_the_file_to_place(places_telea, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    gt, pred, _ = places_telea
    assert score("--pred", pred, "--gt", gt, "--out", tmp_path / "r.json") == 0
    place = str(tmp_path / "th" / "hub" / "checkpoints")
    assert f"LPIPS skipped: no backbone weights; place vgg16-397923af.pth in {place}" in caplog.text
    assert "pt_inception-2015-12-05-6726825d.pth" in caplog.text and "--fid-weights" in caplog.text


def test_bin_names():
    assert [bin_name(f) for f in (0, 0.0999, 0.1, 0.45, 0.9, 1.0)] == [
        "0-10", "0-10", "10-20", "40-50", "90-100", "90-100"
    ]  # fmt: skip


def scipy_fid(a, b):
    """The textbook formula with scipy's matrix square root (pytorch-fid's way)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize(("n_real", "n_fake", "dim"), [(300, 250, 32), (40, 30, 64)])
def test_frechet_distance_matches_scipy(n_real, n_fake, dim):
    rng = np.random.default_rng(dim)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = rng.normal(size=(n_real, dim)) @ mixing
    fake = rng.normal(0.2, 1.3, size=(n_fake, dim)) @ mixing  # shifted and wider
    expected = scipy_fid(real, fake)
    assert expected > 1
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(real, real)) < 1e-6 * expected


def test_inception_discriminative_scores():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(2000, 2))
    # fills from the same distribution: the SVM is at chance (a little below 0.5 as it is scored
    # on the points it was fitted to), each fake about as likely to score "more real"
    same = inception_discriminative_scores(real, rng.normal(size=(2000, 2)))
    assert 0.44 < same["u_ids"] <= 0.5 and 0.44 < same["p_ids"] < 0.56
    # fills shifted far along one axis: perfectly separable, no fake passes for real
    shifted = real + np.array([10.0, 0.0])
    assert inception_discriminative_scores(real, shifted) == {"p_ids": 0.0, "u_ids": 0.0}
    with pytest.raises(ValueError, match="paired"):
        inception_discriminative_scores(real, real[:10])


def test_backbones_have_the_standard_sizes():
    count = sum(p.numel() for p in networks.VGG16Features().parameters())
    assert count == 14_714_688  # torchvision vgg16 convolutions
    count = sum(p.numel() for p in networks.InceptionV3().parameters())
    assert count == 23_850_960  # torchvision inception_v3 without AuxLogits, 1008 classes (TF)
    heads = networks.LPIPSHeads()
    heads.load_state_dict(torch.load(networks.lpips_heads_file(), map_location="cpu"))
    weights = [heads.state_dict()[f"lin{i}.model.1.weight"] for i in range(5)]
    assert [w.shape[1] for w in weights] == [64, 128, 256, 512, 512]
    assert all((w >= 0).all() for w in weights)  # the released v0.1 heads are non-negative


@pytest.fixture(scope="module")
def random_weight_files(tmp_path_factory):
    """Random backbones saved like the real downloads: torchvision VGG16 (with classifier) and
    pytorch-fid InceptionV3 (no BN step counters, with AuxLogits keys to be ignored)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vgg = networks.VGG16Features().state_dict()
    # the classifier is in the real file and must be ignored (small stand-ins keep the test fast)
    vgg |= {"classifier.0.weight": torch.zeros(4096, 7), "classifier.6.bias": torch.zeros(1000)}
    torch.save(vgg, folder / networks.VGG16_FILE)
    inception = networks.InceptionV3().state_dict()
    inception = {k: v for k, v in inception.items() if not k.endswith("num_batches_tracked")}
    inception["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(inception, folder / networks.INCEPTION_FILE)
    return folder


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """3 real photos (64 x 48) as ground truth, their mean-colour fills as predictions."""
    src = shared_path(*PLACES)
    gt, pred = tmp_path_factory.mktemp("sgt"), tmp_path_factory.mktemp("spred")
    names = sorted(p.stem for p in src.glob("freeform_*.png") if "_mask" not in p.stem)[:3]
    for name in names:
        image = Image.open(src / f"{name}.png").convert("RGB").resize((64, 48), Image.BILINEAR)
        mask = Image.open(src / f"{name}_mask.png").resize((64, 48), Image.NEAREST)
        image.save(gt / f"{name}.png"), mask.save(gt / f"{name}_mask.png")
        fill = classical_fill("mean", np.asarray(image), np.asarray(mask) == 255)
        Image.fromarray(fill).save(pred / f"{name}.png")
    return gt, pred


def test_lpips_and_fid_run_end_to_end_with_random_backbones(
    small_set, random_weight_files, tmp_path, monkeypatch
):
    gt, pred = small_set
    weights = ["--lpips-weights", random_weight_files / networks.VGG16_FILE,
               "--fid-weights", random_weight_files / networks.INCEPTION_FILE]  # fmt: skip
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert score("--pred", pred, "--gt", gt, "--masks", gt, "--out", tmp_path / "a.json",
                 "--device", "cpu", "--ids", *weights) == 0  # fmt: skip
    filled = json.loads((tmp_path / "a.json").read_text())
    rows = read_csv(tmp_path / "a.csv")
    assert set(filled["overall"]) == {"psnr", "ssim", "lpips", "fid", "p_ids", "u_ids"}
    assert 0 <= filled["overall"]["p_ids"] <= 1 and 0 <= filled["overall"]["u_ids"] <= 1
    assert all(float(r["lpips"]) > 0 for r in rows.values())
    assert filled["overall"]["lpips"] == pytest.approx(
        np.mean([float(r["lpips"]) for r in rows.values()]), abs=1e-9
    )
    assert filled["overall"]["fid"] > 0
    for values in filled["bins"].values():  # FID per bin needs >= 2 images; IDS overall only
        assert ("fid" in values) == (values["count"] >= 2) and "u_ids" not in values


def test_weights_are_found_in_the_torch_hub_cache(random_weight_files, tmp_path, monkeypatch):
    from moebius.eval.score import load_backbones

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for name in (networks.VGG16_FILE, networks.INCEPTION_FILE):
        (cache / name).symlink_to(random_weight_files / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert networks.find_weights(None, networks.VGG16_FILE) == cache / networks.VGG16_FILE
    backbones = load_backbones(None, None, "cpu")
    assert backbones.skipped == ()
    expected = torch.load(random_weight_files / networks.INCEPTION_FILE)["fc.weight"]
    assert torch.equal(backbones.inception.fc.weight, expected)
    assert isinstance(backbones.lpips, networks.LPIPS)


def test_lpips_is_a_distance_and_inception_gives_pool3(random_weight_files):
    lpips = networks.load_lpips(random_weight_files / networks.VGG16_FILE)
    inception = networks.load_inception(random_weight_files / networks.INCEPTION_FILE)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 40, 56, generator=gen) * 2 - 1, torch.rand(2, 3, 40, 56, generator=gen)
    with torch.no_grad():
        ab, ba, aa = lpips(a, b), lpips(b, a), lpips(a, a)
        single = lpips(a[1:], b[1:])
        images = (torch.rand(2, 3, 37, 50, generator=gen) * 255).to(torch.uint8)
        features = inception(images)
    assert torch.allclose(ab, ba) and (aa == 0).all() and (ab > 0).all()
    assert torch.allclose(single, ab[1:], atol=1e-6)  # batch-independent
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert (features >= 0).all()  # pool3 averages ReLU outputs


def test_wrong_weight_file_is_a_clear_error(random_weight_files, small_set, tmp_path, capsys):
    gt, pred = small_set
    code = score("--pred", pred, "--gt", gt, "--out", tmp_path / "r.json",
                 "--fid-weights", random_weight_files / networks.VGG16_FILE)  # fmt: skip
    assert code == 2
    assert "does not hold the weights this metric needs (pt_inception" in capsys.readouterr().err


def test_missing_predictions_exit_2(small_set, tmp_path, capsys):
    gt, _ = small_set
    (tmp_path / "pred").mkdir()
    assert score("--pred", tmp_path / "pred", "--gt", gt, "--out", tmp_path / "r.json") == 2
    assert "3 of 3 predictions are missing" in capsys.readouterr().err


def test_report_markdown_side_by_side(tmp_path, capsys):
    for folder, method, psnr in (("m", "telea", 21.234), ("m", "mean", 18.5), ("t", "telea", 17)):
        (tmp_path / folder).mkdir(exist_ok=True)
        result = {"count": 40, "overall": {"psnr": psnr, "ssim": 0.71234},
                  "bins": {"0-10": {"count": 3, "psnr": 30.0, "ssim": 0.9}}}  # fmt: skip
        (tmp_path / folder / f"{method}.json").write_text(json.dumps(result))
    paths = [
        tmp_path / "m" / "telea.json",
        tmp_path / "m" / "mean.json",
        tmp_path / "t" / "telea.json",
    ]
    assert markdown_table(paths).splitlines() == [
        "| method | images | PSNR ↑ | SSIM ↑ |",
        "|---|---|---|---|",
        "| m/telea | 40 | 21.23 | 0.7123 |",
        "| mean | 40 | 18.50 | 0.7123 |",
        "| t/telea | 40 | 17.00 | 0.7123 |",
    ]
    assert main(["eval", "report", "--bins", *map(str, paths[1:2])]) == 0
    assert "| mean | 0-10% | 3 | 30.00 | 0.9000 |" in capsys.readouterr().out
