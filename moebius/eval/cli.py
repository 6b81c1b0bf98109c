"""`moebius eval masks | predict | score | report`: benchmark protocols for any inpainting method.

    moebius eval masks   --images DIR --protocol medium_512 --out MASKS --seed 0
    moebius eval predict --method telea --images DIR --masks MASKS --out PRED
    moebius eval score   --pred PRED --gt DIR --masks MASKS --out results.json
    moebius eval report  a.json b.json

`masks` and `predict` also run under `torchrun --nproc_per_node N` (each rank takes a disjoint
slice; the files are the same as one process writes). Exit status: 0 done, 1 some files failed
(each reported, the rest finished), 2 the command could not start.
"""

from __future__ import annotations

import argparse
import sys

from moebius.options import DTYPES, EVAL_METHODS, MASK_PROTOCOLS

# CLI option -> pipeline keyword; unset options keep the pipeline's (the original recipe's) values
RECIPE_OPTIONS = {
    "steps": "steps", "strength": "strength", "guidance": "guidance_scale",
    "noise_offset": "noise_offset", "strategy": "strategy", "margin": "margin",
    "dilate": "mask_dilation", "task": "task", "batch_size": "batch_size",
}  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` and its four subcommands on the `moebius` parser."""
    parser = subparsers.add_parser("eval", help="benchmark: mask sets, predictions, scores",
                                   description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("masks", help="write a protocol's mask set for a folder of images")
    p.add_argument("--images", required=True, help="folder of images (NAME_mask.* are ignored)")
    p.add_argument("--protocol", required=True, choices=MASK_PROTOCOLS)
    p.add_argument("--out", required=True, help="folder for NAME_mask.png + masks.json")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("predict", help="fill every image with one method -> OUT/NAME.png")
    p.add_argument("--method", required=True, choices=EVAL_METHODS)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True, help="folder with NAME_mask.png (255 = fill)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("pipeline options (moebius, pixelhacker)")
    g.add_argument("--weights", help="weights folder or hub repo (default: the method's repo)")
    g.add_argument("--variant", help="released variant (default ft_places2)")
    g.add_argument("--cache-dir", help="Hugging Face cache folder")
    g.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if available, else cpu")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--seed", type=int, default=0, help="noise seed; per image mixed with its name")
    g.add_argument("--steps", type=int)
    g.add_argument("--strength", type=float)
    g.add_argument("--guidance", type=float)
    g.add_argument("--noise-offset", type=float)
    g.add_argument("--strategy")
    g.add_argument("--margin", type=int)
    g.add_argument("--dilate", type=int)
    g.add_argument("--task")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--no-paste", action="store_true")
    g.add_argument("--compensate", action="store_true")

    p = sub.add_parser("score", help="PSNR, SSIM, LPIPS, FID of predictions vs ground truth")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--masks", help="mask folder: adds per hole-area bins")
    p.add_argument("--out", required=True, help="results.json (a per-image .csv goes beside it)")
    p.add_argument("--lpips-weights", help="torchvision vgg16-397923af.pth")
    p.add_argument("--fid-weights", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--ids", action="store_true", help="also P-IDS / U-IDS (needs scikit-learn)")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("report", help="markdown table of several results.json side by side")
    p.add_argument("results", nargs="+")
    p.add_argument("--bins", action="store_true", help="one row per hole-area bin too")
    parser.set_defaults(func=run)
    return parser


def _masks(args) -> int:
    from moebius.eval.masks import make_mask_set

    make_mask_set(args.images, args.protocol, args.out, seed=args.seed)
    return 0


def _predict(args) -> int:
    from moebius.eval.predict import DiffusionOptions, predict_folder

    recipe = {key: getattr(args, name) for name, key in RECIPE_OPTIONS.items()}
    recipe |= {"paste": False if args.no_paste else None, "compensate": args.compensate or None}
    options = DiffusionOptions(args.weights, args.variant, args.cache_dir, args.device,
                               args.dtype, args.seed, recipe)  # fmt: skip
    stats = predict_folder(args.method, args.images, args.masks, args.out, options=options,
                           overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    return 1 if stats["failed"] else 0


def _score(args) -> int:
    from moebius.eval.score import format_table, load_backbones, score_folders, write_results

    backbones = load_backbones(args.lpips_weights, args.fid_weights, args.device)
    results, rows = score_folders(args.pred, args.gt, args.masks, backbones, not args.quiet,
                                  ids=args.ids)  # fmt: skip
    json_path, csv_path = write_results(results, rows, args.out)
    print(format_table(results))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _report(args) -> int:
    from moebius.eval.report import markdown_table

    print(markdown_table(args.results, bins=args.bins))
    return 0


def run(args) -> int:
    """Dispatch `moebius eval SUBCOMMAND`; input problems exit 2 with the message."""
    command = {"masks": _masks, "predict": _predict, "score": _score, "report": _report}
    try:
        return command[args.eval_command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
