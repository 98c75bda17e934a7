"""Command line: a thin layer over the Python API (``lsr.train``, ``lsr.evaluate``,
``lsr.detect_images``, ``lsr.demo``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import DISTANCES, MAP_KINDS, PRESETS, RESAMPLERS, SCORES, SMOOTHINGS, RunConfig


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set expects key=value (e.g. train.vqvae_epochs=10), got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _add_detect_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection options (default: the run's config.json)")
    g.add_argument("--resampler", choices=RESAMPLERS, help="naive (H*W prior passes, reference), "
                   "fast (exact, 1 + changes passes; default) or native")
    g.add_argument("--seed", type=int, help="seed of the pre-drawn resampling noise")
    g.add_argument("--restorations", type=int, help="independent restorations per image, maps averaged")
    g.add_argument("--tau", type=float, help="likelihood threshold (default: calibrated)")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--map", dest="map_kind", choices=MAP_KINDS, help="which difference makes the map")
    g.add_argument("--distance", choices=DISTANCES)
    g.add_argument("--smoothing", choices=SMOOTHINGS)
    g.add_argument("--sigma", type=float, help="smoothing sigma in pixels (model resolution)")
    g.add_argument("--score", choices=SCORES, help="image score from the map")
    g.add_argument("--topk", type=int, help="pixels averaged by --score topk_mean")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: GPU if present)")


def _detect_options(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("resampler", "seed", "restorations", "tau", "temperature", "map_kind", "distance", "smoothing",
            "sigma", "score", "topk")
    return {k: getattr(a, k) for k in keys if getattr(a, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsr", description="Image anomaly detection by Latent Space "
                                "Resampling (VQ-VAE + PixelSNAIL prior), trained on normal images only.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train a run folder from normal images")
    t.add_argument("data", help="MVTec AD category folder (train/good is used) or a folder of images")
    t.add_argument("--out", required=True, help="run folder (resumed if it holds an unfinished run)")
    t.add_argument("--preset", choices=PRESETS, help="default: paper on a GPU, cpu otherwise")
    t.add_argument("--config", help="a config.json to start from (e.g. from another run)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.vqvae_epochs=10 (repeatable)")
    t.add_argument("--device", default=None)
    t.add_argument("--overwrite", action="store_true", help="replace a different run in --out")

    e = sub.add_parser("eval", parents=[common], help="evaluate a run on an MVTec AD category's test set")
    e.add_argument("run")
    e.add_argument("data")
    e.add_argument("--out", required=True)
    _add_detect_options(e)

    d = sub.add_parser("detect", parents=[common], help="detect anomalies in images")
    d.add_argument("run")
    d.add_argument("images", nargs="+", help="image files or folders")
    d.add_argument("--out", required=True)
    d.add_argument("--tiff", action="store_true", help="also write raw float32 maps as TIFF")
    d.add_argument("--no-panels", action="store_true", help="skip the PNG panels")
    _add_detect_options(d)

    m = sub.add_parser("demo", parents=[common], help="build a texture dataset, train, evaluate, report (about 5 min on 2 CPU cores)")
    m.add_argument("--out", default="lsr-demo", help="output folder (default: ./lsr-demo)")
    m.add_argument("--categories", nargs="+", default=None, help="subset of brick grass gravel")
    m.add_argument("--preset", choices=PRESETS, default="demo")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--device", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0       # under torchrun, rank 0 reports
    progress = not args.no_progress and main_rank
    if not main_rank:
        sys.stdout = open(os.devnull, "w")
    try:
        if args.command == "train":
            from .training import default_config, train
            from .config import preset as make_preset
            from .io import read_json

            if args.config:
                cfg = RunConfig.from_dict(read_json(args.config))
                cfg.detect.tau = None
            elif args.preset:
                from .data import detect_channels
                from .training import train_images
                cfg = make_preset(args.preset, in_channels=detect_channels(train_images(args.data)))
            else:
                cfg = default_config(args.data, None, args.device)
            if args.set:
                cfg = cfg.with_overrides(_parse_set(args.set))
            res = train(args.data, args.out, cfg, device=args.device, progress=progress, overwrite=args.overwrite)
            print(f"trained: {res.run} (tau {res.tau:.3g}, held-out prior NLL {res.val_nll:.3f} nats/code)")
        elif args.command == "eval":
            from .evaluation import evaluate
            from .report import format_table

            r = evaluate(args.run, args.data, args.out, batch_size=args.batch_size, device=args.device,
                         progress=progress, **_detect_options(args))
            print(format_table({k: v for k, v in r["methods"].items()},
                               ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]))
            print(f"metrics: {Path(args.out) / 'metrics.json'}   report: {Path(args.out) / 'report.png'}")
        elif args.command == "detect":
            from .detect import detect_images

            rows = detect_images(args.run, args.images, args.out, batch_size=args.batch_size,
                                 device=args.device, save_tiff_maps=args.tiff, panels=not args.no_panels,
                                 progress=progress, **_detect_options(args))
            for r in rows:
                print(f"{r['image']}: score {r['score']:.4f}  nll {r['nll_score']:.1f}  "
                      f"resampled {r['n_resampled']:.0f}  passes {r['prior_passes']}  {r['time_ms']:.0f} ms")
            print(f"results: {Path(args.out) / 'results.jsonl'}")
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, categories=args.categories, preset_name=args.preset,
                     overrides=_parse_set(args.set), device=args.device, progress=progress)
        from .distributed import shutdown
        shutdown()
    except KeyboardInterrupt:
        print("lsr: interrupted (training resumes from the last epoch when run again)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as e:
        if args.debug:
            raise
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
        print(f"lsr: error{where}: {e}", file=sys.stderr)
        return 2
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lsr-export``: not available in this version."""
    argparse.ArgumentParser(prog="lsr-export", description="Export a trained run to TorchScript or "
                            "ONNX (not yet available in this version of lsr).").parse_known_args(argv)
    print("lsr-export: not yet available in this version of lsr (export to TorchScript/ONNX is planned); "
          "use `lsr detect RUN ...` with the trained run folder meanwhile.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
