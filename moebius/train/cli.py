"""`moebius train ...` and `moebius data manifest ...`: argument parsing, then the train package.

  moebius train CONFIG.json --output-dir DIR [--max-steps N] [--resume] [--set KEY=VALUE ...]
  moebius train cache-latents MANIFEST --vae VAE --out DIR [--variants K] [--set KEY=VALUE ...]
  moebius data manifest IMAGE_DIR -o train.jsonl [--masks DIR] [--prompt background|foreground]

Several processes: `torchrun --standalone --nproc_per_node N -m moebius train CONFIG.json ...`.
"""

from __future__ import annotations

import argparse

CACHE_COMMAND = "cache-latents"


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moebius train",
        description="Distil / fine-tune a Moebius student from a JSON config (configs/*.json). "
        f"`moebius train {CACHE_COMMAND} -h` precomputes VAE latents.",
    )
    p.add_argument("config", help="JSON config, e.g. configs/tiny-cpu.json")
    p.add_argument("--output-dir", required=True, help="run folder (checkpoints, final/, logs)")
    p.add_argument("--max-steps", type=int, help="same as --set run.max_steps=N")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.manifest=train.jsonl")  # fmt: skip
    return p


def _cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"moebius train {CACHE_COMMAND}",
        description="Store the VAE posterior (mean, logvar) of K augmented draws of every "
        "manifest row, so training (data.latent_cache=DIR) never runs the VAE encoder.",
    )
    p.add_argument("manifest", help="jsonl manifest (moebius data manifest)")
    p.add_argument("--vae", required=True, help='AutoencoderKL folder, or "tiny" (seeded random)')
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--variants", type=int, default=8, help="augmented draws per row")
    p.add_argument("--config", help="JSON config whose data section / seeds to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    return p


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moebius data", description="Training data tools.")
    sub = p.add_subparsers(dest="data_command", required=True)
    m = sub.add_parser("manifest", help="write a jsonl manifest of an image folder",
                       description="Write a jsonl manifest (paths relative to it) of the images "
                       "in IMAGE_DIR; *_mask.* files are masks, never images.")  # fmt: skip
    m.add_argument("image_dir")
    m.add_argument("-o", "--output", required=True, help="manifest file (.jsonl)")
    m.add_argument("--masks", help="folder with NAME_mask.* / NAME.* masks")
    m.add_argument("--prompt", choices=("background", "foreground"), default="background")
    return p


def main(argv: list[str]) -> int:
    """`train ...` or `data ...` (argv without the program name); returns the exit status."""
    command, rest = argv[0], list(argv[1:])
    try:
        if command == "data":
            return run_manifest(_data_parser().parse_args(rest))
        if rest[:1] == [CACHE_COMMAND]:
            return _run_cache(_cache_parser().parse_args(rest[1:]))
        return run_train(_train_parser().parse_args(rest))
    except SystemExit as done:  # -h (0) or a bad option (2): argparse has printed
        return done.code


def run_manifest(args) -> int:
    from moebius.train.data import write_manifest

    rows = write_manifest(args.image_dir, args.output, args.masks, args.prompt)
    with_mask = sum("mask" in r for r in rows)
    print(f"{args.output}: {len(rows)} rows ({with_mask} with a mask)")
    return 0


def _load_config(path, overrides):
    """The config, with what is wrong in it as a UsageError (one line, exit status 2)."""
    from moebius.errors import UsageError
    from moebius.train.config import load_config

    try:
        return load_config(path, overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(f"config {path or '(defaults)'}: {err}") from err


def run_train(a) -> int:
    from moebius.train.loop import train

    overrides = list(a.set) + ([f"run.max_steps={a.max_steps}"] if a.max_steps else [])
    config = _load_config(a.config, overrides)
    final = train(config, a.output_dir, resume=a.resume)
    print(final)
    return 0


def _run_cache(a) -> int:
    import torch

    from moebius.train.cache import cache_latents
    from moebius.train.networks import load_vae

    config = _load_config(a.config, a.set)
    vae = load_vae(a.vae, config.model.init_seed).to(torch.device(a.device))
    d = config.data
    out = cache_latents(
        a.manifest, vae, a.out, variants=a.variants, seed=config.run.seed,
        resolution=d.resolution, mask_protocol=d.mask_protocol,
        generated_mask_p=d.generated_mask_p, dilation_p=d.dilation_p, flip_p=d.flip_p,
    )  # fmt: skip
    print(out)
    return 0
