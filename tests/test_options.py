"""moebius.options: the choices and checks of every option, torch-free, with messages that teach."""

import math
import re
import subprocess
import sys

import pytest

from moebius import options


@pytest.mark.parametrize(
    ("key", "good", "bad", "words"),
    [
        ("steps", [1, 20, 1000], [0, -1, 2.5, True, "3", None], "integer >= 1"),
        ("strength", [1e-6, 0.5, 0.99, 1, 1.0], [0, -0.1, 1.01, 2, math.nan, math.inf], "(0, 1]"),
        ("guidance_scale", [0, 1, 2.5, -3.0, 100], [math.nan, math.inf, -math.inf, "2"], "finite"),
        ("noise_offset", [0, 0.0357, 1], [math.nan, math.inf], "finite"),
        ("batch_size", [1, 64], [0, -2, 1.0], "integer >= 1"),
        ("mask_dilation", [0, 3], [-3, 0.5], "integer >= 0"),
        ("margin", [0, 128], [-1], "integer >= 0"),
        ("max_pixels", [1, 10**8], [0, -5], "integer >= 1"),
        ("strategy", list(options.STRATEGIES), ["bogus", "", "Crop"], "auto, native, crop, resize"),
        ("task", list(options.TASKS), ["bogus", None], "remove, object"),
        ("model", list(options.MODELS), ["sd15"], "moebius, pixelhacker"),
        ("variant", list(options.VARIANTS), ["ft_imagenet"], "pretrained, ft_places2"),
        ("dtype", list(options.DTYPES), ["float64", "fp16"], "float32, float16, bfloat16"),
        ("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"], ["gpu", "cuda:", "cuda:x"],
         "auto, cpu, cuda, mps"),
    ],
)  # fmt: skip
def test_each_validator_accepts_the_good_and_teaches_about_the_bad(key, good, bad, words):
    check = options.VALIDATORS[key]
    for value in good:
        check(value, key)
        options.validate(**{key: value})
    for value in bad:
        if value is None and key not in ("task",):  # None = unset for validate(), not for check
            continue
        with pytest.raises(ValueError) as info:
            check(value, key)
        message = str(info.value)
        assert key in message and words in message and repr(value) in message, message
        assert "\n" not in message  # one line: the CLI prints it as is


def test_validate_names_options_as_the_caller_spells_them():
    with pytest.raises(ValueError, match=r"^--guidance must be a finite number .* got nan$"):
        options.validate({"guidance_scale": "--guidance"}, guidance_scale=math.nan, steps=3)
    options.validate(steps=None, strength=None, guidance_scale=None)  # unset: nothing to check
    with pytest.raises(TypeError, match="unknown option 'stepz'"):
        options.validate(stepz=3)


def test_steps_times_strength_must_run_at_least_one_step():
    options.validate(steps=20, strength=0.05)  # int(1.0) = 1 step
    with pytest.raises(ValueError, match=r"int\(steps \* strength\) = 0"):
        options.validate(steps=20, strength=0.04)


def test_the_names_have_one_home():
    from moebius import hub, recipe, strategies

    assert strategies.STRATEGIES is options.STRATEGIES
    assert recipe.TASKS is options.TASKS
    assert tuple(hub.MODEL_REPOS) == options.MODELS
    assert options.DEFAULT_MODEL in options.MODELS
    assert options.DEFAULT_VARIANT in options.VARIANTS


def test_options_and_the_cli_module_import_no_torch():
    code = "import sys, moebius.options, moebius.cli, moebius.errors; print(sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(proc.stdout))
    assert {"moebius.options", "moebius.cli"} <= loaded
    assert not loaded & {"torch", "diffusers", "numpy", "PIL"}


@pytest.mark.parametrize(("flag", "choices"), [("--strategy", options.STRATEGIES),
                                               ("--task", options.TASKS)])  # fmt: skip
def test_bad_choice_exits_2_with_the_choices_before_torch(flag, choices, tmp_path):
    """`python -m moebius inpaint --strategy bogus a.png m.png -o o.png`: argparse refuses it."""
    argv = [sys.executable, "-X", "importtime", "-m", "moebius", "inpaint", flag, "bogus",
            "a.png", "m.png", "-o", str(tmp_path / "o.png")]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "invalid choice: 'bogus'" in line]
    assert len(error) == 1 and flag in error[0]
    assert all(re.search(rf"\b{name}\b", error[0].split("choose from")[1]) for name in choices)
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M)
    assert "moebius.cli" in imported and "argparse" in imported
    assert not {"torch", "diffusers", "numpy", "PIL"} & set(imported)
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.png").exists()


def test_version_has_one_home():
    import moebius

    proc = subprocess.run([sys.executable, "-m", "moebius", "--version"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert proc.stdout.strip() == f"moebius {moebius.__version__}"
    from importlib.metadata import version

    assert version("moebius-inpaint") == moebius.__version__
