"""The training loop: distil (or fine-tune) the Moebius student, spec training.md section 3.

`train(config, output_dir)` builds the networks, data, optimizer and schedule, then runs one
step at a time (`train_step`, the spec's 3.1 in order), logging every loss, weight and gradient
norm to metrics.jsonl, TensorBoard and a tqdm bar, and writing checkpoints that `resume=True`
continues from exactly. The math (losses, gradient-norm weights, Muon, EMA) lives in the pure
modules beside this one; this file only wires them together.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from moebius import masks
from moebius import vae as vae_lib
from moebius.errors import UsageError
from moebius.recipe import make_scheduler
from moebius.train import (
    EMA,
    build_optimizer,
    distill_losses,
    distributed,
    logs_to_floats,
    weighting_params,
)
from moebius.train import checkpoint as ckpt
from moebius.train.config import TrainConfig, save_config
from moebius.train.data import (
    DataError,
    DataPosition,
    EpochSampler,
    InpaintDataset,
    collate,
    read_manifest,
)
from moebius.train.losses import offset_noise
from moebius.train.networks import build_networks, resolve_perceptual

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
# The metrics every logged step carries (None where a term is off), in this order.
METRIC_KEYS = (
    "step", "loss", "loss_task", "loss_output_kd", "loss_feature_kd", "loss_perceptual",
    "weight_output_kd", "weight_perceptual", "weight_feature", "lr", "grad_norm",
)  # fmt: skip


def make_noise_scheduler() -> DDPMScheduler:
    """The training forward process: SD scaled-linear betas, 1000 steps, epsilon (spec 3.1.6)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
        prediction_type="epsilon",
    )


def logit_normal_timesteps(batch: int, generator: torch.Generator) -> torch.Tensor:
    """t = floor(1000 * sigmoid(u)), u ~ N(0, 1): integers 0..999 [B] (spec 3.1.5)."""
    u = torch.randn(batch, generator=generator, device=generator.device)
    t = (NUM_TRAIN_TIMESTEPS * torch.sigmoid(u)).floor().long()
    return t.clamp_(0, NUM_TRAIN_TIMESTEPS - 1)


def posterior_latents(batch: dict, vae, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Scaled posterior samples (image, masked image) [B, 4, h, w]: VAE encoder or latent cache."""
    if "latent_mean" in batch:  # cached posterior: z = (mean + std * eps) * scaling_factor
        out = []
        for key in ("latent", "masked_latent"):
            mean, logvar = batch[f"{key}_mean"], batch[f"{key}_logvar"]
            eps = torch.randn(mean.shape, generator=generator, device=generator.device)
            z = torch.nan_to_num(mean + torch.exp(0.5 * logvar) * eps, nan=0.0)
            out.append(z * vae.config.scaling_factor)
        return tuple(out)
    with torch.no_grad():
        shape = vae_lib.latent_shape(vae, *batch["image"].shape[:1], *batch["image"].shape[2:])
        eps = [torch.randn(shape, generator=generator, device=generator.device) for _ in "ab"]
        latents = vae_lib.encode(vae, batch["image"], eps[0])
        masked = vae_lib.encode(vae, batch["masked_image"], eps[1])
    return latents, masked


# ----------------------------------------------------------------------------------- one step
def train_step(batch, nets, student, optimizer, lr_scheduler, ema, config, noise_scheduler, gen,
               autocast) -> tuple[dict, float]:  # fmt: skip
    """One optimisation step (spec 3.1): noise, both networks, losses, backward, clip, update.

    Returns the logs (detached tensors, None for terms that are off) and the step's learning rate.
    """
    device = gen.device
    batch = {k: v.to(device) for k, v in batch.items()}
    latents, masked_latents = posterior_latents(batch, nets.vae, gen)  # (B, 4, h, w) each
    mask = (
        batch["latent_mask"]
        if "latent_mask" in batch
        else masks.latent_mask(batch["mask"].float(), latents.shape[-2:])
    )  # (B, 1, h, w), nearest, as the original
    noise = offset_noise(latents.shape, config.run.noise_offset, gen, device)  # incl. offset
    timesteps = logit_normal_timesteps(latents.shape[0], gen).to(device)
    x_t = noise_scheduler.add_noise(latents, noise, timesteps)  # sqrt(ab) x0 + sqrt(1-ab) eps
    sample = torch.cat([x_t, mask, masked_latents], dim=1)  # (B, 9, h, w)
    ids = batch["input_ids"]
    with autocast():  # accelerate upcasts every output to fp32, so do the losses below
        eps_s, feats_s = student(sample, timesteps, ids, return_features=True)
        eps_t = feats_t = None
        if nets.teacher is not None:
            with torch.no_grad():
                eps_t, feats_t = nets.teacher(sample, timesteps, ids, return_features=True)
    p_feature, p_output = weighting_params(student, config.loss.feature_pairs[0][0])
    total, logs = distill_losses(
        config.loss,
        eps_student=eps_s.float(),
        noise=noise,
        student_features=[f.float() for f in feats_s],
        eps_teacher=None if eps_t is None else eps_t.float(),
        teacher_features=None if feats_t is None else [f.float() for f in feats_t],
        feature_param=p_feature,
        output_param=p_output,
        x_t=x_t,
        alpha_bar_t=noise_scheduler.alphas_cumprod.to(device)[timesteps],
        perceptual=nets.perceptual,
    )
    total.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
    optimizer.step()
    if ema is not None:
        ema.update(getattr(student, "module", student))
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**logs, "grad_norm": grad_norm.detach()}, lr


# ----------------------------------------------------------------------------------- the run
class _StopRequest:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, then stop."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logger.warning("got %s: saving a checkpoint after this step", signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast_factory(precision: str, device: torch.device):
    """bf16 autocast where the device supports it ("auto": CUDA with bf16), else a no-op."""
    bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def _data(config: TrainConfig, d, position: DataPosition, vae):
    """DataLoader over the manifest (or latent cache) from `position`, this rank's share."""
    from moebius.train import cache

    c = config.data
    if c.latent_cache:
        dataset = cache.LatentDataset(c.latent_cache, seed=config.run.seed)
        dataset.check_vae(vae)
    else:
        dataset = InpaintDataset(
            read_manifest(c.manifest), c.resolution, c.mask_protocol, c.generated_mask_p,
            c.dilation_p, c.flip_p, seed=config.run.seed, skip_unreadable=c.skip_unreadable,
        )  # fmt: skip
    sampler = EpochSampler(len(dataset), d.rank, d.world, config.run.seed, position.epoch,
                           position.offset)  # fmt: skip
    per_epoch = math.ceil(len(dataset) / d.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.run.batch_size, sampler=sampler, collate_fn=collate,
        num_workers=c.num_workers, persistent_workers=c.num_workers > 0,
    )  # fmt: skip
    return loader, per_epoch


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False) -> Path:
    """Run (or continue, `resume`) a training run writing into `output_dir`; returns final/."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    d = distributed.setup()
    try:
        return _train(config, output_dir, resume, d, tqdm)
    finally:
        distributed.teardown(d)


def _train(config, output_dir, resume, d, tqdm) -> Path:
    if not (config.data.manifest or config.data.latent_cache):
        raise UsageError(
            "no training data: set data.manifest (a jsonl from `moebius data manifest`) or "
            "data.latent_cache (a folder from `moebius train cache-latents`)"
        )
    config, perceptual = resolve_perceptual(config, d.device)
    config_json = json.dumps(config.to_dict(), indent=2) + "\n"
    start = ckpt.latest_checkpoint(output_dir) if resume else None
    if resume and start is None:
        logger.warning("--resume: no checkpoint in %s, starting from step 0", output_dir)
    if d.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"resolved config:\n{config_json}", end="", flush=True)
        save_config(config, output_dir / "config.json")
    nets = build_networks(config)
    nets.perceptual = perceptual
    nets.student.to(d.device)
    if nets.teacher is not None:
        nets.teacher.to(d.device)
    nets.vae.to(d.device)
    optimizer = build_optimizer(
        nets.student.named_parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    from diffusers.optimization import get_constant_schedule_with_warmup

    lr_scheduler = get_constant_schedule_with_warmup(optimizer, config.optim.warmup_steps)
    ema = EMA(nets.student, decay=config.optim.ema_decay) if config.optim.ema else None
    gen = torch.Generator(d.device).manual_seed(config.run.seed * 1000 + d.rank)
    step, position = 0, DataPosition()
    if start is not None:
        state = ckpt.load_checkpoint(start, nets.student, ema)
        if len(state["rng"]) != d.world:
            raise UsageError(
                f"{start} was written by {len(state['rng'])} process(es), this run has {d.world}: "
                "resume with the same number of processes (each has its own data and noise stream)"
            )
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        ckpt.set_rng_states(state["rng"][d.rank], gen)
        step, position = state["step"], DataPosition(**state["data"][d.rank])
        logger.info("resumed from %s (step %d)", start, step)
    student = distributed.wrap(nets.student, d)
    loader, per_epoch = _data(config, d, position, nets.vae)
    noise_scheduler = make_noise_scheduler()
    autocast = _autocast_factory(config.run.precision, d.device)
    writer = metrics_file = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"))
        metrics_file = _open_metrics(output_dir / "metrics.jsonl", step)

    def save() -> None:
        states = _gather(d, {"rng": ckpt.rng_states(gen), "data": vars(position).copy()})
        if d.main:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "rng": states["rng"], "data": states["data"]}  # fmt: skip
            ckpt.save_checkpoint(output_dir, step, nets.student, state, config_json, ema,
                                 keep=config.run.keep_checkpoints)  # fmt: skip
        distributed.barrier(d)

    bar = tqdm(total=config.run.max_steps, initial=step, desc="train", unit="step",
               disable=not (d.main and config.run.progress))  # fmt: skip
    batches, stopping = iter(loader), False
    with _StopRequest() as stop:
        while step < config.run.max_steps:
            batch = _next_batch(batches)
            position.advance(config.run.batch_size, per_epoch)
            if _any(d, batch is None):  # a batch of only skipped (unreadable) samples, any rank
                continue
            batch.pop("index")
            logs, lr = train_step(batch, nets, student, optimizer, lr_scheduler, ema, config,
                              noise_scheduler, gen, autocast)  # fmt: skip
            step += 1
            bar.update(1)
            if d.main and (step % config.run.log_every == 0 or step == config.run.max_steps):
                record = {"step": step, "lr": lr, **logs_to_floats(logs)}
                _log(record, metrics_file, writer, bar)
            stopping = _any(d, stop.requested)  # every rank stops at the same step
            if step % config.run.save_every == 0 or stopping or step == config.run.max_steps:
                save()
            if stopping:
                break
    bar.close()
    if writer is not None:
        writer.close()
        metrics_file.close()
    if stopping:
        logger.warning("stopped at step %d (checkpoint saved); continue with --resume", step)
        return output_dir / ckpt.CHECKPOINTS
    final = output_dir / ckpt.FINAL
    if d.main:
        export = nets.student
        if ema is not None:  # the exported weights are the EMA copy (with the model's BN stats)
            export = _ema_copy(nets.student, ema)
        ckpt.export_final(output_dir, export, nets.vae, make_scheduler())
    distributed.barrier(d)
    return final


def _ema_copy(student, ema):
    import copy

    clone = copy.deepcopy(student)
    ema.copy_to(clone)
    return clone


def _next_batch(batches):
    """The next batch; a DataError from a loader worker keeps its message, not the traceback."""
    try:
        return next(batches)
    except DataError as err:
        lines = str(err).strip().splitlines()
        if len(lines) > 1 and "Original Traceback" in str(err):  # re-raised by the DataLoader
            raise DataError(lines[-1].split(": ", 1)[-1]) from None
        raise


def _open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, without the lines of steps after `step` (the checkpoint's)."""
    lines = path.read_text().splitlines(keepends=True) if step and path.is_file() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(kept))
    return path.open("a")


def _log(record: dict, metrics_file, writer, bar) -> None:
    """One metrics.jsonl line (METRIC_KEYS first, None for terms that are off) + TensorBoard."""
    record = {**{k: record.get(k) for k in METRIC_KEYS}, **record}
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    for key, value in record.items():
        if key != "step" and value is not None:
            writer.add_scalar(f"train/{key}", value, record["step"])
    shown = {k: record[k] for k in ("loss", "loss_task", "loss_output_kd") if record[k] is not None}
    bar.set_postfix({k.removeprefix("loss_") or k: f"{v:.4g}" for k, v in shown.items()})


def _any(d, flag: bool) -> bool:
    """True on every rank when any rank got a stop signal (they must stop at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def _gather(d, obj: dict) -> dict:
    """{"rng": [per rank], "data": [per rank]} on every rank."""
    if not d.enabled:
        return {k: [v] for k, v in obj.items()}
    out = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return {k: [o[k] for o in out] for k in obj}
