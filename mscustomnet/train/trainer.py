"""The MS-CustomNet training loop: AdamW, Dual Stage Training, CLSQ, AMP, gradient accumulation, DDP, exact resume.

Loss: paper Eq. 12-14 is CustomNet's epsilon-prediction MSE with its condition dropout for classifier-free guidance
(:meth:`CustomNetModel.training_loss`). Trained: UNet (with ``to_k_text``/``to_v_text`` at
``train.text_attention_lr_scale`` x the stage lr, as CustomNet does), F_proj and Phi_c; the VAE and both CLIP towers
stay frozen, in eval mode and without gradients.

Determinism: every random draw of a step (VAE posterior sample, condition dropout, timesteps, noise) comes from a
generator seeded by (seed, optimiser step, global micro-batch index); the data order of an epoch is
``DistributedSampler(seed, epoch)``; the subject subsets are drawn by the Dataset from (seed, epoch, image id). So a
run resumed from a checkpoint continues exactly as the uninterrupted run (bitwise on CPU), and one process
accumulating ``W`` micro-batches of 1 computes the same steps as ``W`` DDP ranks with a micro-batch of 1 each (up to
the order of the gradient sum).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from mscustomnet.data.build import MANIFEST_FILE
from mscustomnet.data.dataset import MSIDataset, collate_msi
from mscustomnet.model.network import CustomNetModel
from mscustomnet.model.unet import DualCrossAttnProcessor
from mscustomnet.train import checkpoint as ckpt
from mscustomnet.train.config import ConfigError, TrainConfig
from mscustomnet.train.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    init_process_group,
    mean_over_ranks,
    pick_device,
)
from mscustomnet.train.logger import StepLogger
from mscustomnet.train.samples import sample_grid, save_grid
from msibench.cache import mkstemp as umask_mkstemp
from msibench.cache import sha256_file
from msibench.coco import CATEGORY_INDEX
from msibench.records import exclusive_or_busy

TRAIN_LOCK = ".train.lock"

log = logging.getLogger(__name__)
# One line per logged step, to train.log only (the console has the progress bar).
steps_log = logging.getLogger(__name__ + ".steps")
steps_log.propagate = False

MODEL_DIR = "model"
RUN_FILE = "run.json"
TRAIN_LOG = "train.log"
LOSS_SMOOTHING = 0.9  # exponential moving average of the bar's loss (bias-corrected, as TensorBoard's smoothing)


@contextlib.contextmanager
def train_log_file(path: Path):
    """Log this package's (and msibench's) INFO messages and the step lines to ``path`` (appended across resumes),
    whatever the console's level: the console handlers keep showing exactly what they showed before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    loggers = [logging.getLogger("mscustomnet"), logging.getLogger("msibench")]
    saved = [lg.level for lg in loggers]
    shown = {lg.name: lg.getEffectiveLevel() for lg in loggers}  # what reached the console until now

    def console_filter(record: logging.LogRecord) -> bool:
        level = shown.get(record.name.split(".", 1)[0])
        return level is None or record.levelno >= level

    root_handlers = list(root.handlers)
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)  # INFO reaches the file ...
    for h in root_handlers:
        h.addFilter(console_filter)  # ... and the console as before
    steps_log.addHandler(handler)
    steps_log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        steps_log.removeHandler(handler)
        for h in root_handlers:
            h.removeFilter(console_filter)
        for lg, level in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


class TrainProgress:
    """One progress bar over the whole run (global step, smoothed loss, lr, K, epoch; tqdm's rate and ETA). While
    it is open, log messages (checkpoints, sample grids) are printed above the bar, not through it."""

    def __init__(self, total: int, initial: int, *, enabled: bool, epochs: int) -> None:
        self.total, self.initial, self.enabled, self.epochs = total, initial, enabled, epochs
        self._ema: float | None = None
        self._weight = 0.0
        self._bar = None
        self._redirect = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, initial=self.initial, desc="train", unit="step", dynamic_ncols=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def step(self, global_step: int, loss: float, *, lr: float, k: int, epoch: int, stage: int) -> float:
        """Record a finished optimiser step; returns the smoothed loss."""
        if math.isfinite(loss):
            self._weight = LOSS_SMOOTHING * self._weight + (1 - LOSS_SMOOTHING)
            prev = 0.0 if self._ema is None else self._ema
            self._ema = LOSS_SMOOTHING * prev + (1 - LOSS_SMOOTHING) * loss
        smoothed = self._ema / self._weight if self._ema is not None else float("nan")
        if self._bar is not None:
            self._bar.update(global_step - self._bar.n)
            self._bar.set_postfix_str(
                f"step {global_step}, loss {smoothed:.4f}, lr {lr:.2g}, K={k}, epoch {epoch}/{self.epochs} "
                f"(stage {stage})",
                refresh=False,
            )
        return smoothed


@dataclass(frozen=True)
class TrainResult:
    out: Path
    global_step: int
    epoch: int
    finished: bool  # every epoch of every stage done (False when stopped by train.max_steps)
    checkpoint: Path | None
    model_dir: Path | None
    losses: tuple[float, ...]  # loss of each optimiser step run by this call (mean over ranks and micro-batches)


def load_initial_model(config: TrainConfig) -> CustomNetModel:
    """``model.init`` as an MS-CustomNet model in float32 on the CPU: a CustomNet folder gets Phi_c and F_proj's
    category columns (``CustomNetModel.from_customnet``, seeded by ``train.seed``)."""
    from mscustomnet.model.io import load_model

    m = config.model
    model = load_model(
        m.init,
        revision=m.revision,
        device="cpu",
        dtype=torch.float32,
        what="initial",
        hint=f"{config.source}: model.init must name a folder written by `mscustomnet convert-customnet` "
        "(CustomNet) or by `mscustomnet train` (MS-CustomNet), or a hub id with model.revision.",
    )
    if not model.config.multi_subject:
        model = CustomNetModel.from_customnet(model, category_dim=m.category_dim, seed=config.train.seed)
    elif model.config.category_dim != m.category_dim:
        raise ConfigError(
            f"{config.source}: model.category_dim is {m.category_dim}, but {m.init} is an MS-CustomNet model with "
            f"category_dim {model.config.category_dim}"
        )
    model.config = replace(model.config, use_layout=m.use_layout)
    return model


def init_weights_sha256(config: TrainConfig) -> str | None:
    from mscustomnet.model.io import read_model_info

    info = read_model_info(config.model.init)
    return info.get("weights_sha256") if info else None


def check_sdpa_attention(model: CustomNetModel) -> None:
    """Every attention of the UNet must go through ``F.scaled_dot_product_attention`` (memory-efficient kernels)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    bad = {
        name: type(proc).__name__
        for name, proc in model.unet.attn_processors.items()
        if not isinstance(proc, AttnProcessor2_0 | DualCrossAttnProcessor)
    }
    if bad:
        raise RuntimeError(f"attention processors without scaled_dot_product_attention: {bad}")


def step_seed(seed: int, global_step: int, micro_batch: int) -> int:
    """Seed of the random draws of one micro-batch; ``micro_batch`` = accumulation index x world size + rank."""
    state = np.random.SeedSequence([seed, global_step, micro_batch]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def category_lookup() -> torch.Tensor:
    """COCO category id -> contiguous index 0..79 (-1 for ids that are no category, and for padding)."""
    lut = torch.full((max(CATEGORY_INDEX) + 1,), -1, dtype=torch.int64)
    for cid, index in CATEGORY_INDEX.items():
        lut[cid] = index
    return lut


def latent_loss_mask(content_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, 1, R, R] photo-vs-padding mask -> [B, 1, R/f, R/f] at latent resolution: a latent cell counts when any
    pixel it covers is photo (cells straddling the photo's edge carry photo content)."""
    return F.max_pool2d(content_mask.float(), kernel_size=factor, stride=factor)


def prepare_batch(
    raw: dict[str, Any], lut: torch.Tensor, device: torch.device, loss_mask_factor: int | None = None
) -> dict[str, Any]:
    """A ``collate_msi`` batch ([0, 1] images, COCO category ids) as ``training_loss`` input ([-1, 1], 0..79).

    With ``loss_mask_factor`` (the VAE's downsampling) the batch carries ``loss_mask``: the letterbox padding of
    ``fit="pad"`` at latent resolution, left out of the diffusion loss."""
    ids = raw["category_ids"]
    known = (ids >= 0) & (ids < len(lut))
    categories = torch.where(known, lut[ids.clamp(0, len(lut) - 1)], torch.full_like(ids, -1))
    if bool(((categories < 0) & raw["subject_mask"]).any()):
        raise ValueError(f"category ids {sorted(set(ids[raw['subject_mask']].tolist()))} include non-COCO ids")
    nb = device.type == "cuda"
    return {
        "image": raw["image"].to(device, non_blocking=nb) * 2 - 1,
        "layout": raw["layout_map"].to(device, non_blocking=nb) * 2 - 1,
        "references": raw["references"].to(device, non_blocking=nb) * 2 - 1,
        "subject_mask": raw["subject_mask"].to(device),
        "categories": categories.to(device),
        "text": list(raw["prompt"]),
        **(
            {"loss_mask": latent_loss_mask(raw["content_mask"], loss_mask_factor).to(device, non_blocking=nb)}
            if loss_mask_factor is not None
            else {}
        ),
    }


class _LossModule(nn.Module):
    """DDP needs the loss computed inside a module's forward so that its gradient hooks are armed."""

    def __init__(self, model: CustomNetModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.model.training_loss(batch, generator=generator).loss


def make_optimizer(model: CustomNetModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable groups; each group keeps its ``lr_scale`` (text attention: x
    ``train.text_attention_lr_scale``) and gets ``lr = stage lr x lr_scale`` (:func:`set_stage_lr`)."""
    t = config.train
    groups = model.parameter_groups()
    scales = {"text_attention": t.text_attention_lr_scale, "unet": 1.0, "projection": 1.0}
    param_groups = [
        {"params": groups[name], "name": name, "lr_scale": scale} for name, scale in scales.items() if groups.get(name)
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr_for_epoch(1), weight_decay=t.weight_decay)
    set_stage_lr(optimizer, config.lr_for_epoch(1))
    return optimizer


def set_stage_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def autocast_for(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``train.mixed_precision`` (fp16 / bf16), or nothing (``no``)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)


class TrainStep:
    """One optimiser step over ``grad_accum`` micro-batches: autocast forward, scaled backward (DDP gradient sync on
    the last micro-batch only), optional clipping, AdamW and the grad scaler's update. Returns this process's mean
    loss."""

    def __init__(
        self,
        model: CustomNetModel,
        config: TrainConfig,
        device: torch.device,
        env: DistEnv,
        grad_accum: int,
        forward: nn.Module | None = None,
    ) -> None:
        self.config, self.device, self.env, self.grad_accum = config, device, env, grad_accum
        self.forward = forward if forward is not None else _LossModule(model)
        self.ddp = self.forward if isinstance(self.forward, DistributedDataParallel) else None
        self.optimizer = make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.mixed_precision == "fp16")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lut = category_lookup()
        # The letterbox padding of data.fit: pad carries no signal; unless configured otherwise, it stays out of the
        # loss (a no-op for fit: crop, whose canvas is all photo).
        self.loss_mask_factor = model.config.vae.scale_factor if config.train.loss_mask_padding else None

    def __call__(self, micro_batches: list[dict[str, Any]], global_step: int) -> float:
        t = self.config.train
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        loss_sum = torch.zeros((), device=self.device)
        for j, raw in enumerate(micro_batches):
            batch = prepare_batch(raw, self.lut, self.device, self.loss_mask_factor)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(t.seed, global_step, j * self.env.world_size + self.env.rank))
            last = j == self.grad_accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with autocast_for(self.device, t.mixed_precision):
                    loss = self.forward(batch, generator)
                self.scaler.scale(loss / self.grad_accum).backward()
            loss_sum += loss.detach().float()
        if t.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.item()) / self.grad_accum


class Trainer:
    """One training run into ``out``. ``model`` may be injected (tests); otherwise it is built from ``model.init``."""

    def __init__(
        self,
        config: TrainConfig,
        out: str | Path,
        *,
        model: CustomNetModel | None = None,
        device: str | None = None,
        env: DistEnv | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.env = env or DistEnv.from_env()
        self.grad_accum = config.grad_accum_for(self.env.world_size)
        self.device = pick_device(self.env, device)
        self.progress = progress
        self._model = model

    # ----------------------------------------------------------------------------------------------- setup
    def _dataset(self) -> MSIDataset:
        d, c = self.config.data, self.config.curriculum
        dataset = MSIDataset(
            d.msi,
            resolution=d.resolution,
            reference_resolution=d.reference_resolution,
            reference_object_size=d.reference_object_size,
            total_epochs=self.config.total_epochs,
            k_min=c.k_min,
            k_max=c.k_max,
            gamma=c.gamma,
            curriculum=c.enabled,
            seed=self.config.train.seed,
            fit=d.fit,
            image_root=d.image_root,
        )
        if d.max_scenes is not None:
            dataset.scenes = dataset.scenes[: d.max_scenes]
        return dataset

    def _write_run_info(self, resumed_from: Path | None, manifest_sha: str) -> None:
        import diffusers

        info = {
            "config": self.config.to_dict(),
            "config_file": self.config.source,
            "world_size": self.env.world_size,
            "grad_accum": self.grad_accum,
            "device": str(self.device)
            + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
            },
            "msi_manifest_sha256": manifest_sha,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        fd, tmp = umask_mkstemp(self.out, prefix=f".{RUN_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.out / RUN_FILE)

    # -------------------------------------------------------------------------------------------- the loop
    def run(self, resume: str | Path | None = None) -> TrainResult:
        """Train (or resume). One training per ``out`` at a time: a second one is refused at once with
        :class:`~msibench.records.LockBusyError` naming the holder (the same lock as ``msibench run``'s shards);
        under torchrun the main rank holds it for its group."""
        if (
            resume is not None
            and str(resume) == ckpt.LATEST
            and not (ckpt.checkpoint_root(self.out) / ckpt.LATEST).is_file()
        ):
            # the run stopped before its first checkpoint: nothing to continue, and nothing is lost by starting over
            log.warning(
                "--resume latest: %s holds no checkpoint yet (the run stopped before its first save, "
                "train.checkpoint_every sets how often it saves): starting from step 0",
                self.out,
            )
            resume = None
        lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = exclusive_or_busy(
                self.out / TRAIN_LOCK,
                f"the training run in {self.out}",
                "wait for it to end or stop it, or train into another --out",
            )
        with lock:
            created_group = init_process_group(self.env, self.device)
            try:
                return self._run(resume)
            finally:
                if created_group:
                    torch.distributed.destroy_process_group()

    def _run(self, resume: str | Path | None) -> TrainResult:
        config, env, t = self.config, self.env, self.config.train
        dataset = self._dataset()
        manifest_sha = sha256_file(Path(config.data.msi) / MANIFEST_FILE)
        model = self._model if self._model is not None else load_initial_model(config)
        model.to(self.device)
        check_sdpa_attention(model)
        if t.grad_checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.train()
        forward: nn.Module = _LossModule(model)
        if env.distributed:
            forward = DistributedDataParallel(
                forward,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
            )
        step = TrainStep(model, config, self.device, env, self.grad_accum, forward=forward)
        optimizer, scaler = step.optimizer, step.scaler
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        init_sha = init_weights_sha256(config) if self._model is None else None

        epoch, steps_done, global_step = 1, 0, 0
        resumed_from = None
        if resume is None and (ckpt.checkpoint_root(self.out) / ckpt.LATEST).exists():
            raise FileExistsError(
                f"{self.out} already holds a run with checkpoints: continue it with --resume latest, or train into "
                "another --out folder"
            )
        if resume is not None:
            resumed_from = ckpt.find_checkpoint(self.out, resume)
            state = ckpt.load_checkpoint(resumed_from)
            self._check_resumable(state, resumed_from, manifest_sha, init_sha, set(trainable))
            with torch.no_grad():
                for name, tensor in state["model"].items():
                    trainable[name].copy_(tensor)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            p = state["progress"]
            epoch, steps_done, global_step = p["epoch"], p["steps_done_in_epoch"], p["global_step"]
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])

        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_run_info(resumed_from, manifest_sha)
        logger = StepLogger(self.out, resume_step=global_step if resume is not None else None) if env.is_main else None
        n = len(dataset)
        per_rank = math.ceil(n / env.world_size)
        steps_per_epoch = (per_rank // t.per_gpu_batch) // self.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(
                f"{config.source}: {n} scene(s) in {config.data.msi} make no full optimiser step of "
                f"{t.effective_batch} samples over {env.world_size} process(es)"
            )
        if steps_done >= steps_per_epoch:  # the checkpoint closed its epoch
            epoch, steps_done = epoch + 1, 0
        losses: list[float] = []
        last_checkpoint: Path | None = None
        stopped = t.max_steps is not None and global_step >= t.max_steps

        def save(epoch_now: int, done_in_epoch: int) -> Path | None:
            self._check_ranks_in_sync(trainable)
            rngs = all_gather_objects(env, ckpt.rng_state())
            path = None
            if env.is_main:
                state = {
                    "config": config.resume_fingerprint(),
                    "msi_manifest_sha256": manifest_sha,
                    "init_weights_sha256": init_sha,
                    "world_size": env.world_size,
                    "model": {name: p.detach() for name, p in trainable.items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "progress": {
                        "epoch": epoch_now,
                        "steps_done_in_epoch": done_in_epoch,
                        "global_step": global_step,
                        "steps_per_epoch": steps_per_epoch,
                    },
                    "rng": rngs,
                }
                path = ckpt.save_checkpoint(self.out, global_step, state, keep=t.keep_checkpoints)
            barrier(env)
            return path

        total_steps = steps_per_epoch * config.total_epochs
        if t.max_steps is not None:
            total_steps = min(total_steps, t.max_steps)
        with contextlib.ExitStack() as stack:  # the bar, and train.log, for the loop and the final model
            bar_on = self.progress and env.is_main
            progress = stack.enter_context(
                TrainProgress(total_steps, global_step, enabled=bar_on, epochs=config.total_epochs)
            )
            if env.is_main:  # after the bar: its console handler gets the filter too
                stack.enter_context(train_log_file(self.out / TRAIN_LOG))
            if resumed_from is not None:
                log.info("resumed from %s at step %d (epoch %d, %d steps into it)", resumed_from, global_step, epoch,
                         steps_done)  # fmt: skip
            log.info("%d scenes, %d step(s) per epoch of %d samples (%d x %d GPU(s) x %d accumulation), %d epoch(s), "
                     "%d steps in all", n, steps_per_epoch, t.effective_batch, t.per_gpu_batch, env.world_size,
                     self.grad_accum, config.total_epochs, total_steps)  # fmt: skip
            loader_gen = torch.Generator()
            while epoch <= config.total_epochs and not stopped:
                stage = config.stage_of_epoch(epoch)
                lr = config.lr_for_epoch(epoch)
                set_stage_lr(optimizer, lr)
                dataset.set_epoch(epoch)
                k = dataset.k_for_epoch(epoch)
                sampler = DistributedSampler(
                    range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=t.seed, drop_last=False
                )
                sampler.set_epoch(epoch)
                per_step = t.per_gpu_batch * self.grad_accum
                indices = list(sampler)[steps_done * per_step : steps_per_epoch * per_step]
                loader_gen.manual_seed(t.seed + epoch)  # worker seeds only; the samples do not depend on them
                loader = DataLoader(
                    dataset,
                    batch_size=t.per_gpu_batch,
                    sampler=indices,
                    num_workers=config.data.workers,
                    collate_fn=collate_msi,
                    pin_memory=self.device.type == "cuda",
                    drop_last=True,
                    generator=loader_gen,
                )
                batches = iter(loader)
                while steps_done < steps_per_epoch:
                    start = time.perf_counter()
                    micro_batches = [next(batches) for _ in range(self.grad_accum)]
                    # Most subjects of any sample of the step on this rank (K(e) unless scenes have fewer).
                    subjects = max(int(raw["num_subjects"].max()) for raw in micro_batches)
                    loss_value = mean_over_ranks(env, step(micro_batches, global_step), self.device)
                    global_step += 1
                    steps_done += 1
                    if not math.isfinite(loss_value) and t.mixed_precision != "fp16":
                        raise FloatingPointError(f"loss is {loss_value} at step {global_step} (epoch {epoch})")
                    losses.append(loss_value)
                    elapsed = time.perf_counter() - start
                    smoothed = progress.step(global_step, loss_value, lr=lr, k=k, epoch=epoch, stage=stage + 1)
                    if logger is not None and global_step % t.log_every == 0:
                        row = {"step": global_step, "epoch": epoch, "stage": stage + 1, "lr": lr, "loss": loss_value,
                               "k": k, "subjects": subjects, "samples_per_s": t.effective_batch / elapsed,
                               "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else 1.0,
                               "time_s": elapsed}  # fmt: skip
                        logger.log(row)
                        steps_log.info(
                            "step %d/%d epoch %d/%d stage %d K=%d lr %g loss %.5f (smoothed %.5f) %.2f samples/s",
                            global_step, progress.total, epoch, config.total_epochs, stage + 1, k, lr, loss_value,
                            smoothed, row["samples_per_s"],
                        )  # fmt: skip
                    every = config.samples.every
                    if every is not None and global_step % every == 0 and env.is_main:
                        grid = sample_grid(model, dataset, config, config.samples.count)
                        log.info("sample grid: %s", save_grid(grid, self.out, global_step))
                    at_max = t.max_steps is not None and global_step >= t.max_steps
                    periodic = t.checkpoint_every is not None and global_step % t.checkpoint_every == 0
                    if at_max or periodic or steps_done == steps_per_epoch:
                        last_checkpoint = save(epoch, steps_done) or last_checkpoint
                    if at_max:
                        stopped = True
                        break
                if not stopped:
                    epoch, steps_done = epoch + 1, 0
            if steps_done >= steps_per_epoch:
                epoch, steps_done = epoch + 1, 0
            finished = epoch > config.total_epochs
            model_dir = None
            if env.is_main:
                from mscustomnet.model.io import save_model

                model_dir = save_model(
                    model,
                    self.out / MODEL_DIR,
                    training={
                        "config": config.to_dict(),
                        "config_file": config.source,
                        "global_step": global_step,
                        "epoch": min(epoch, config.total_epochs),
                        "finished": finished,
                        "init_weights_sha256": init_sha,
                    },  # fmt: skip
                )
                log.info("model written to %s", model_dir)
            barrier(env)
            if logger is not None:
                logger.close()
        return TrainResult(
            out=self.out,
            global_step=global_step,
            epoch=min(epoch, config.total_epochs),
            finished=finished,
            checkpoint=last_checkpoint,
            model_dir=model_dir,
            losses=tuple(losses),
        )

    # --------------------------------------------------------------------------------------------- checks
    def _check_resumable(
        self, state: dict[str, Any], path: Path, manifest_sha: str, init_sha: str | None, names: set[str]
    ) -> None:
        saved, current = state["config"], self.config.resume_fingerprint()
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ConfigError(f"{self.config.source}: cannot resume {path}: the configuration changed ({details})")
        if state["msi_manifest_sha256"] != manifest_sha:
            raise ValueError(
                f"cannot resume {path}: {self.config.data.msi}/{MANIFEST_FILE} is not the data it trained on"
            )
        if init_sha is not None and state["init_weights_sha256"] not in (None, init_sha):
            raise ValueError(f"cannot resume {path}: the weights at model.init ({self.config.model.init}) changed")
        if set(state["model"]) != names:
            missing, extra = sorted(names - set(state["model"])), sorted(set(state["model"]) - names)
            raise ValueError(
                f"cannot resume {path}: trainable tensors differ (missing {missing[:3]}, extra {extra[:3]})"
            )
        p = state["progress"]
        if state["world_size"] != self.env.world_size:
            if 0 < p["steps_done_in_epoch"] < p["steps_per_epoch"]:
                raise ValueError(
                    f"cannot resume {path} mid-epoch with {self.env.world_size} process(es): it was saved by "
                    f"{state['world_size']} and the epoch's data split would differ (resume from an end-of-epoch "
                    "checkpoint instead)"
                )
            log.warning("resuming a %d-process checkpoint with %d processes", state["world_size"], self.env.world_size)

    def _check_ranks_in_sync(self, trainable: dict[str, torch.Tensor]) -> None:
        if not self.env.distributed:
            return
        with torch.no_grad():
            digest = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in trainable.values()])
        digests = all_gather_objects(self.env, digest.cpu())
        for rank, other in enumerate(digests[1:], start=1):
            if not torch.allclose(other, digests[0], rtol=1e-6, atol=0.0):
                raise RuntimeError(f"rank {rank}'s trainable weights differ from rank 0's: the processes diverged")


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    model: CustomNetModel | None = None,
    device: str | None = None,
    progress: bool = False,
) -> TrainResult:
    """Run (or resume) training as configured; see :class:`Trainer`."""
    return Trainer(config, out, model=model, device=device, progress=progress).run(resume)


__all__ = [
    "MODEL_DIR",
    "RUN_FILE",
    "TRAIN_LOG",
    "TrainProgress",
    "TrainResult",
    "TrainStep",
    "Trainer",
    "autocast_for",
    "category_lookup",
    "check_sdpa_attention",
    "latent_loss_mask",
    "load_initial_model",
    "make_optimizer",
    "prepare_batch",
    "set_stage_lr",
    "step_seed",
    "train",
]
