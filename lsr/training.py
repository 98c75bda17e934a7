"""Training: VQ-VAE, code extraction, PixelSNAIL prior, tau calibration.

``train(DATA, RUN)`` runs the four stages in order. Each stage saves its state after
every epoch under ``RUN/checkpoints``, so an interrupted run resumes where it stopped
when called again with the same ``RUN`` and configuration. Progress bars show loss and
images/s; every epoch is one line in ``RUN/train_log.jsonl``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import anomaly, runfolder
from . import distributed as dist
from .checkpoint import load_into, load_training_state, save_training_state, save_weights
from .config import RunConfig, preset
from .data import DataError, detect_channels, list_images, load_images, scan_mvtec, split_train_val
from .distributed import resolve_device
from .io import append_jsonl, atomic_write, locks_output, write_json
from .models import VQVAE, FeatureVQVAE, PixelSNAIL, build_vqvae


class TrainResult(NamedTuple):
    run: Path
    config: RunConfig
    tau: float
    val_nll: float          # held-out prior NLL, nats per code
    uniform_nll: float      # log K: what a uniform guess costs


def train_images(data: str | os.PathLike) -> list[Path]:
    """Training images: ``DATA/train/good`` of an MVTec AD category, else a plain folder."""
    data = Path(data)
    if (data / "train").is_dir():
        return scan_mvtec(data, require_test=False).train
    return list_images([data])


def default_config(data: str | os.PathLike, preset_name: str | None = None,
                   device: str | torch.device | None = None, paths: Sequence[Path] | None = None) -> RunConfig:
    """The preset for this device (``gpu`` on a GPU, ``cpu`` otherwise; both feature space)
    with the input channels read from the training images (``paths``, when the caller
    has listed them already: the folder is scanned once)."""
    dev = resolve_device(device)
    name = preset_name or ("gpu" if dev.type == "cuda" else "cpu")
    return preset(name, in_channels=detect_channels(train_images(data) if paths is None else paths))


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs))))


class _Stage:
    """Shared bookkeeping of a training stage: progress bar, log, time cap."""

    def __init__(self, name: str, run: Path, total_steps: int, progress: bool, max_minutes: float,
                 ctx: dist.Context, last_epoch: int = -1):
        from tqdm.auto import tqdm

        self.name, self.run, self.ctx = name, run, ctx
        if ctx.main:
            _prune_log(run / "train_log.jsonl", name, last_epoch)
        self.bar = tqdm(total=total_steps, desc=name, unit="batch", disable=not (progress and ctx.main),
                        dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.max_seconds = max_minutes * 60.0

    def out_of_time(self) -> bool:
        """Rank 0's clock decides, so every rank stops after the same epoch. The cap is an
        opt-in safety valve (``train.max_minutes``); when it fires, it says so loudly,
        because the model then depends on the machine's speed."""
        over = bool(dist.broadcast_object(self.max_seconds > 0 and time.perf_counter() - self.t0 > self.max_seconds))
        if over and self.ctx.main:
            import sys
            msg = (f"lsr: WARNING: the {self.name} stage hit train.max_minutes = {self.max_seconds / 60:g} and "
                   f"stopped before its epoch budget; the result now depends on this machine's speed "
                   f"(set train.max_minutes=0 for the fixed budget)")
            print(msg, file=sys.stderr, flush=True)
            self.log(warning=msg)
        return over

    def log(self, **fields: Any) -> None:
        if self.ctx.main:
            append_jsonl(self.run / "train_log.jsonl", {"stage": self.name, "time": time.time(), **fields})

    def close(self) -> None:
        self.bar.close()


def _prune_log(path: Path, stage: str, last_epoch: int) -> None:
    """Drop the log lines of ``stage`` after its last checkpointed epoch: a training
    interrupted between logging an epoch and checkpointing it runs that epoch again on
    resume, and the log should hold each epoch once (the checkpoint's version of it)."""
    import json

    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue                                   # a line cut by a crash mid-write
        if row.get("stage") == stage and isinstance(row.get("epoch"), int) and row["epoch"] > last_epoch:
            continue
        keep.append(line)
    if keep != lines:
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move restored optimiser moments to the training device (``step`` stays on the CPU)."""
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and k != "step":
                st[k] = v.to(device)


def _augment(x: Tensor, hflip: bool, vflip: bool, g: torch.Generator) -> Tensor:
    if hflip:
        m = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
    if vflip:
        m = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-2), x)
    return x


def _wrap(model: torch.nn.Module, ctx: dist.Context) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged over ranks), else as is."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _local_weight(n_local: int, n_global: int, ctx: dist.Context) -> float:
    """Scale of a rank's mean loss so that DDP's average over ranks equals the mean over
    the global batch, also when the last batch does not split evenly."""
    return n_local * ctx.world / n_global


def train_vqvae(model: VQVAE, train_x: Tensor, val_x: Tensor, cfg: RunConfig, run: Path,
                device: torch.device, progress: bool = True, ctx: dist.Context | None = None) -> dict[str, float]:
    """Train the VQ-VAE. Under torchrun each global batch of ``train.batch_size`` images is
    split across the ranks; EMA codebook statistics are summed over ranks, so every rank
    keeps the same codebook, and the result matches one process with the same batch."""
    ctx = ctx or dist.Context(0, 1, device)
    t = cfg.train
    g = torch.Generator().manual_seed(t.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=t.vqvae_lr)
    state_path = run / "checkpoints" / "vqvae_state"
    info = load_training_state(state_path, model, opt, g) or {"epoch": -1, "done": False}
    model.to(device)
    _optimizer_to(opt, device)
    if info.get("done"):
        return info.get("metrics", {})
    n = train_x.shape[0]
    bs = min(t.batch_size, n)
    steps = math.ceil(n / bs)
    features = isinstance(model, FeatureVQVAE)
    bank = _feature_bank(model, train_x, t.hflip, t.vflip, device) if features else None
    stage = _Stage("vqvae", run, steps * (t.vqvae_epochs - info["epoch"] - 1), progress, t.max_minutes, ctx,
                   info["epoch"])
    if not bool(model.quantizer.initialised):
        with torch.no_grad():
            first = bank[(False, False)][:256].to(device) if features else train_x[:256].to(device)
            model.quantizer.init_from(model.encoder(first), generator=g)
    net = _wrap(model, ctx)
    reduce = dist.all_reduce_sum if ctx.enabled else None
    gather = dist.all_gather_cat if ctx.enabled else None
    check_sync, checked = dist.sync_check_enabled(), 0
    metrics: dict[str, float] = {}
    for epoch in range(info["epoch"] + 1, t.vqvae_epochs):
        model.train()
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(t.vqvae_lr, epoch, t.vqvae_epochs)
        perm = torch.randperm(n, generator=g)
        sums = torch.zeros(2, dtype=torch.float64)             # loss, reconstruction MSE (x images)
        restarts = 0
        t_ep = time.perf_counter()
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            mine = dist.shard(torch.arange(len(idx)), ctx)
            if features:
                f_all, x_all = _augment_features(bank, train_x, idx, t.hflip, t.vflip, g)
                x, f = x_all[mine].to(device), f_all[mine].to(device)
                out = net(f)
                rec = F.mse_loss(out.reconstruction, f)
                loss = rec + out.loss + t.picture_weight * F.mse_loss(out.picture, x)
            else:
                x_all = _augment(train_x[idx], t.hflip, t.vflip, g)     # the global batch, same on all ranks
                x = x_all[mine].to(device)
                out = net(x)
                rec = F.mse_loss(out.reconstruction, x)
                loss = rec + out.loss
            if t.ssim_weight > 0:
                loss = loss + t.ssim_weight * anomaly.ssim_distance(out.reconstruction, x).mean()
            opt.zero_grad(set_to_none=True)
            (loss * _local_weight(len(x), len(idx), ctx)).backward()
            opt.step()
            n_restarted = model.quantizer.ema_update(out.z_e.detach(), out.indices, generator=g,
                                                     reduce=reduce, gather=gather)
            if n_restarted and ctx.enabled:
                # every rank drew the same restarts from the gathered batch; rank 0's codebook
                # is nevertheless what all ranks keep
                for name in ("codebook", "embed_sum", "cluster_size", "unused_steps"):
                    if hasattr(model.quantizer, name):
                        dist.broadcast(getattr(model.quantizer, name).data)
            restarts += n_restarted
            if check_sync:
                dist.assert_in_sync(model, f"vqvae epoch {epoch} step {s}")
                checked += 1
            sums += torch.tensor([loss.item(), rec.item()], dtype=torch.float64) * len(x)
            stage.bar.update(1)
            stage.bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}",
                                  img_s=f"{(s + 1) * bs / (time.perf_counter() - t_ep):.0f}")
        dist.all_reduce_sum(sums)
        metrics = {"loss": float(sums[0]) / n, "train_mse": float(sums[1]) / n,
                   **vqvae_val_metrics(model, val_x, device),
                   "restarts": restarts, "images_per_s": n / (time.perf_counter() - t_ep)}
        if check_sync:
            metrics["steps_checked_in_sync"] = checked
        stage.log(epoch=epoch, **metrics)
        last = epoch == t.vqvae_epochs - 1 or stage.out_of_time()
        if ctx.main:
            save_training_state(state_path, model, opt, g, {"epoch": epoch, "done": last, "metrics": metrics})
        dist.barrier()
        if last:
            break
    stage.close()
    return metrics


@torch.no_grad()
def _feature_bank(model: FeatureVQVAE, x: Tensor, hflip: bool, vflip: bool, device: torch.device,
                  batch: int = 16) -> dict[tuple[bool, bool], Tensor]:
    """Normalised backbone features of the training images under every flip the
    augmentation can draw, computed once (the backbone is frozen); also sets the model's
    per-channel feature statistics from the unflipped images. {(hflip, vflip): (N, F, h, w)}."""
    model.eval()
    variants = [(h, v) for h in ((False, True) if hflip else (False,)) for v in ((False, True) if vflip else (False,))]
    raw: dict[tuple[bool, bool], Tensor] = {}
    for h, v in variants:
        parts = []
        for s in range(0, x.shape[0], batch):
            xs = x[s:s + batch]
            xs = xs.flip(-1) if h else xs
            xs = xs.flip(-2) if v else xs
            parts.append(model.raw_features(xs.to(device)).cpu())
        raw[(h, v)] = torch.cat(parts)
    model.set_feature_stats(raw[(False, False)].to(model.feature_mean.device))
    mean, std = model.feature_mean.cpu().view(1, -1, 1, 1), model.feature_std.cpu().view(1, -1, 1, 1)
    return {k: (r - mean) / std for k, r in raw.items()}


def _augment_features(bank: dict[tuple[bool, bool], Tensor], x: Tensor, idx: Tensor, hflip: bool, vflip: bool,
                      g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The features and images of a batch under random flips (drawn as :func:`_augment` draws)."""
    n = len(idx)
    mh = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    mv = torch.rand(n, generator=g) < 0.5 if vflip else torch.zeros(n, dtype=torch.bool)
    feats, imgs = [], []
    for j, i in enumerate(idx.tolist()):
        h, v = bool(mh[j]), bool(mv[j])
        feats.append(bank[(h, v)][i])
        xi = x[i].flip(-1) if h else x[i]
        imgs.append(xi.flip(-2) if v else xi)
    return torch.stack(feats), torch.stack(imgs)


@torch.no_grad()
def vqvae_val_metrics(model: VQVAE | FeatureVQVAE, val_x: Tensor, device: torch.device) -> dict[str, float]:
    """Held-out reconstruction error (of the image, or of the normalised features in
    features mode, where the pixel decoder's picture error is reported too) and code use."""
    model.eval()
    features = isinstance(model, FeatureVQVAE)
    mse, pic, counts = 0.0, 0.0, torch.zeros(model.quantizer.codebook_size)
    for s in range(0, val_x.shape[0], 32):
        x = val_x[s:s + 32].to(device)
        inp = model.features(x) if features else x
        out = model(inp)
        mse += float(F.mse_loss(out.reconstruction, inp, reduction="sum")) / inp[0].numel()
        if features:
            pic += float(F.mse_loss(out.picture, x, reduction="sum")) / x[0].numel()
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=counts.numel()).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    n = max(1, val_x.shape[0])
    extra = {"val_picture_mse": pic / n} if features else {}
    return {"val_mse": mse / n, **extra, "val_perplexity": perplexity, "codes_used": int((counts > 0).sum())}


@torch.no_grad()
def extract_codes(model: VQVAE, x: Tensor, device: torch.device, shifts: int = 1, seed: int = 0,
                  max_cells: int = 2) -> Tensor:
    """Codes (N * shifts, h, w): the images as they are, then ``shifts - 1`` copies shifted
    by random pixel offsets of up to ``max_cells`` code cells (reflect-padded), which
    augment the prior's training set.

    Any pixel offset, not only whole cells: a whole-cell shift only moves the same codes,
    while a sub-cell shift makes the encoder produce new, still normal code grids. On the
    demo's gravel texture this lowered the held-out prior NLL from 2.92 to 2.44 nats/code
    (uniform: 3.47), measured on held-out normal images only.
    """
    model.eval()
    pad = max_cells * model.cfg.downsample
    g = torch.Generator().manual_seed(seed + 7)
    S = x.shape[-1]
    out = []
    for k in range(shifts):
        offsets = (0, 0) if k == 0 else tuple(int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=g))
        for s in range(0, x.shape[0], 32):
            xs = x[s:s + 32]
            if offsets != (0, 0):
                dy, dx = offsets
                xp = F.pad(xs, (pad, pad, pad, pad), mode="reflect")
                xs = xp[:, :, pad + dy:pad + dy + S, pad + dx:pad + dx + S]
            out.append(model.encode(xs.to(device)).cpu())
    return torch.cat(out)


def train_prior(prior: PixelSNAIL, train_codes: Tensor, val_codes: Tensor, cfg: RunConfig, run: Path,
                device: torch.device, progress: bool = True, ctx: dist.Context | None = None) -> dict[str, float]:
    """Train the prior with cross-entropy (teacher forcing) and early stopping on the
    held-out NLL; under torchrun each global batch is split across the ranks."""
    ctx = ctx or dist.Context(0, 1, device)
    t = cfg.train
    g = torch.Generator().manual_seed(t.seed + 1)
    opt = torch.optim.Adam(prior.parameters(), lr=t.prior_lr)
    state_path = run / "checkpoints" / "prior_state"
    info = load_training_state(state_path, prior, opt, g) or {
        "epoch": -1, "done": False, "best_val_nll": float("inf"), "bad_epochs": 0}
    prior.to(device)
    _optimizer_to(opt, device)
    best_path = run / "checkpoints" / "prior_best.safetensors"
    if info.get("done"):
        load_into(prior, best_path, device)
        return info.get("metrics", {})
    n = train_codes.shape[0]
    bs = min(t.prior_batch_size, n)
    steps = math.ceil(n / bs)
    stage = _Stage("prior", run, steps * (t.prior_epochs - info["epoch"] - 1), progress, t.max_minutes, ctx,
                   info["epoch"])
    net = _wrap(prior, ctx)
    check_sync, checked = dist.sync_check_enabled(), 0
    metrics: dict[str, float] = {}
    for epoch in range(info["epoch"] + 1, t.prior_epochs):
        prior.train()
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(t.prior_lr, epoch, t.prior_epochs)
        perm = torch.randperm(n, generator=g)
        tot = torch.zeros(1, dtype=torch.float64)
        t_ep = time.perf_counter()
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            c = train_codes[dist.shard(idx, ctx)].to(device)
            loss = F.cross_entropy(net(c), c)
            opt.zero_grad(set_to_none=True)
            (loss * _local_weight(c.shape[0], len(idx), ctx)).backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            if check_sync:
                dist.assert_in_sync(prior, f"prior epoch {epoch} step {s}")
                checked += 1
            tot += loss.item() * c.shape[0]
            stage.bar.update(1)
            stage.bar.set_postfix(epoch=epoch, nll=f"{loss.item():.3f}",
                                  img_s=f"{(s + 1) * bs / (time.perf_counter() - t_ep):.0f}")
        dist.all_reduce_sum(tot)
        val_nll = prior_nll(prior, val_codes, device)          # the same on every rank
        improved = val_nll < info["best_val_nll"]
        if improved:
            info["best_val_nll"], info["bad_epochs"] = val_nll, 0
            if ctx.main:
                save_weights(best_path, prior)
        else:
            info["bad_epochs"] += 1
        metrics = {"train_nll": float(tot) / n, "val_nll": val_nll, "best_val_nll": info["best_val_nll"],
                   "images_per_s": n / (time.perf_counter() - t_ep)}
        if check_sync:
            metrics["steps_checked_in_sync"] = checked
        stage.log(epoch=epoch, **metrics)
        last = epoch == t.prior_epochs - 1 or info["bad_epochs"] >= t.patience or stage.out_of_time()
        info.update(epoch=epoch, done=last, metrics=metrics)
        if ctx.main:
            save_training_state(state_path, prior, opt, g, info)
        dist.barrier()
        if last:
            break
    stage.close()
    load_into(prior, best_path, device)
    return metrics


@torch.no_grad()
def prior_nll(prior: PixelSNAIL, codes: Tensor, device: torch.device) -> float:
    """Mean -log p(c_t | c_<t) in nats per code over a set of code grids."""
    prior.eval()
    tot, cnt = 0.0, 0
    for s in range(0, codes.shape[0], 64):
        c = codes[s:s + 64].to(device)
        tot += float(F.cross_entropy(prior(c), c, reduction="sum"))
        cnt += c.numel()
    return tot / max(1, cnt)


@torch.no_grad()
def calibrate(prior: PixelSNAIL, val_codes: Tensor, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """tau = a low quantile of the held-out normal codes' likelihoods (never test data)."""
    from .ops import flag_positions

    prior.eval()
    ps = []
    for s in range(0, val_codes.shape[0], 64):
        c = val_codes[s:s + 64].to(device)
        ps.append(prior.log_likelihood(c).exp().cpu())
    p = torch.cat(ps)                                                     # (N, h, w)
    q = cfg.detect.tau_quantile
    tau = float(torch.quantile(p.flatten().double(), q))
    flagged = flag_positions(p, tau).flatten(1).sum(1).float()
    return {"tau": tau, "tau_quantile": q, "n_val_images": int(p.shape[0]),
            "val_codes_below_tau": float((p < tau).float().mean()),
            "val_flagged_per_image_mean": float(flagged.mean()),
            "val_flagged_per_image_max": float(flagged.max()),
            "val_likelihood_median": float(p.median())}


@locks_output("out")
def train(data: str | os.PathLike, out: str | os.PathLike, config: RunConfig | None = None, *,
          preset_name: str | None = None, device: str | torch.device | None = None,
          progress: bool = True, overwrite: bool = False,
          log: Callable[[str], None] = print, images: Sequence[Path] | None = None) -> TrainResult:
    """Train a run folder from normal images.

    Args:
        data: an MVTec AD category folder (``train/good`` is used; ``test/`` never is)
            or a plain folder of normal images.
        out: the run folder. If it holds an unfinished run with the same
            configuration, training resumes from its last epoch.
        config: full configuration; default: :func:`default_config`.
        preset_name: preset for the default configuration.
        device: ``cpu``, ``cuda``, ... (default: a GPU if there is one).
        overwrite: start afresh even if ``out`` holds another run.
        images: the training images of ``data`` when the caller has listed them already
            (:func:`train_images`), so that the folder is scanned once.
    """
    ctx = dist.context(device)                     # one process, or this rank of a torchrun job
    dev = ctx.device
    run = Path(out)
    if not ctx.main:
        log = _silent
    paths = train_images(data) if images is None else [Path(p) for p in images]
    cfg = config or default_config(data, preset_name, dev, paths)
    cfg.validate()
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    vqvae = build_vqvae(cfg.vqvae)                 # loads (and checks) a backbone before RUN is touched
    train_p, val_p = split_train_val(paths, t.val_fraction, t.seed)
    show = progress and ctx.main
    # every image is decoded (and a bad one named) before RUN is touched
    train_x = torch.from_numpy(load_images(train_p, cfg.vqvae.in_channels, cfg.vqvae.image_size, show))
    val_x = torch.from_numpy(load_images(val_p, cfg.vqvae.in_channels, cfg.vqvae.image_size, show))
    fingerprint = runfolder.data_fingerprint(paths)
    if ctx.main:
        split = {"data": str(Path(data).resolve()), "train": [str(p) for p in train_p],
                 "val": [str(p) for p in val_p]}
        runfolder.prepare(run, cfg, fingerprint, split, overwrite, log)
    dist.barrier()                                 # rank 0 has checked (and may have cleared) RUN
    torch.manual_seed(t.seed)
    log(f"{len(train_p)} training and {len(val_p)} held-out images from {data}; "
        f"{cfg.vqvae.image_size} px, {cfg.vqvae.in_channels} channel(s), preset {cfg.preset}, device {dev}"
        + (f", {ctx.world} processes" if ctx.enabled else ""))

    vq_metrics = train_vqvae(vqvae, train_x, val_x, cfg, run, dev, progress, ctx)
    if ctx.main:
        save_weights(run / "vqvae.safetensors", vqvae)
    log(f"VQ-VAE: held-out MSE {vq_metrics.get('val_mse', float('nan')):.5f}, "
        f"{vq_metrics.get('codes_used', 0)}/{cfg.vqvae.codebook_size} codes used")

    train_codes = extract_codes(vqvae, train_x, dev, shifts=max(1, t.shift_augment), seed=t.seed)
    val_codes = extract_codes(vqvae, val_x, dev)

    torch.manual_seed(t.seed + 1)
    prior = PixelSNAIL(cfg.prior)
    pr_metrics = train_prior(prior, train_codes, val_codes, cfg, run, dev, progress, ctx)
    val_nll = prior_nll(prior, val_codes, dev)
    uniform = math.log(cfg.prior.codebook_size)
    log(f"prior: held-out NLL {val_nll:.3f} nats/code (uniform guess {uniform:.3f})")

    calib = calibrate(prior, val_codes, cfg, dev)
    calib.update(val_nll=val_nll, uniform_nll=uniform, vqvae=vq_metrics, prior=pr_metrics)
    from .detect import Detector, apply_held_out, held_out_posterior_scale, score_stats
    calib["posterior_scale"] = held_out_posterior_scale(vqvae, val_x)
    cfg = dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, tau=calib["tau"],
                                                              posterior_scale=calib["posterior_scale"]))
    stats = score_stats(Detector(vqvae, prior, cfg, dev), val_x)
    cfg = apply_held_out(cfg, stats)
    calib["held_out_scores"] = {k: v for k, v in stats.items() if not k.endswith("_info")}
    calib["thresholds"] = {"image": stats.get("image_threshold_info"), "pixel": stats.get("pixel_threshold_info")}
    if ctx.main:
        save_weights(run / "prior.safetensors", prior)
        write_json(run / "calibration.json", calib)
        write_json(run / "config.json", cfg.to_dict())
        runfolder.finish(run, fingerprint)
    dist.barrier()                                 # the run folder is complete for every rank
    log(f"tau = {calib['tau']:.3g} ({calib['tau_quantile']:.0%} quantile of held-out code likelihoods; "
        f"{calib['val_flagged_per_image_mean']:.1f} codes per held-out image meet the rule)")
    return TrainResult(run, cfg, calib["tau"], val_nll, uniform)


def _silent(*_: Any) -> None:
    pass


__all__ = ["train", "TrainResult", "default_config", "train_images", "extract_codes", "calibrate",
           "DataError"]
