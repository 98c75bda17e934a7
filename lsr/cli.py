"""Command line: a thin layer over the Python API (``lsr.train``, ``lsr.evaluate``,
``lsr.commands.detect_images``, ``lsr.demo``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (DISTANCES, MAP_KINDS, OPTION_RULES, PRESETS, RESAMPLERS, SCORES, SMOOTHINGS, WEIGHTINGS,
                     Rule, RunConfig, check_value)
from .deploy.bundle import is_bundle


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
                   "fast (exact, 1 + changes passes), native (the same loop with lazy, incremental passes: in "
                   "C++ for a run, in numpy over prior_rows.onnx for an ONNX bundle) or auto (native when "
                   "it can run, else fast; the default)")
    g.add_argument("--seed", type=int, help="seed of the pre-drawn resampling noise")
    g.add_argument("--restorations", type=int, help="independent restorations per image, maps averaged")
    g.add_argument("--tau", type=float, help="likelihood threshold (default: calibrated)")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--map", dest="map_kind", choices=MAP_KINDS, help="which difference makes the map (gated: "
                   "restored vs input only where codes were resampled)")
    g.add_argument("--distance", choices=DISTANCES, help="pixel space: l2, ssim, msgms; feature space: l2, cosine")
    g.add_argument("--score-distance", choices=("map",) + DISTANCES,
                   help="the distance of the map the image score reduces (default map: the map's own)")
    g.add_argument("--smoothing", choices=SMOOTHINGS)
    g.add_argument("--sigma", type=float, help="smoothing sigma in pixels (model resolution)")
    g.add_argument("--score", choices=SCORES, help="image score from the map")
    g.add_argument("--topk", type=int, help="pixels averaged by --score topk_mean")
    g.add_argument("--pool", type=int, help="window side (model pixels) of --score pooled_max")
    g.add_argument("--gate-dilate", type=int, help="cells the resampled-code mask of --map gated is dilated by")
    g.add_argument("--weighting", choices=WEIGHTINGS, help="how --restorations are combined")
    g.add_argument("--posterior", type=float, help="draw resampled codes from the prior times "
                   "exp(-POSTERIOR * distance to the encoder's output / scale): 0 is the prior alone (the paper); "
                   "default: the run's (2 for the feature presets, 0 for the pixel ones)")
    g.add_argument("--false-alarm-rate", type=float, help="image threshold for this rate of good images "
                   "flagged (set again on the run's held-out normal images; default: the run's, 0.01)")
    g.add_argument("--pixel-fpr", type=float, help="pixel threshold for this per-pixel false-positive rate "
                   "on good images (default: the run's, 0.001)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: GPU if present)")


_FLAGS = {"map_kind": "--map", "gate_dilate": "--gate-dilate"}
_RESAMPLED = True                   # --explain without N: the resampled codes


def flag(key: str) -> str:
    """The command-line flag of a detect option (``map_kind`` -> ``--map``)."""
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def _detect_options(a: argparse.Namespace) -> dict[str, Any]:
    """The detect options given on the command line, each checked against its rule
    (lsr.config.RULES): an error names the flag."""
    keys = ("resampler", "seed", "restorations", "tau", "temperature", "map_kind", "distance", "score_distance",
            "smoothing", "sigma", "score", "topk", "pool", "gate_dilate", "weighting", "posterior",
            "false_alarm_rate", "pixel_fpr")
    opts = {k: check_value(f"detect.{k}", getattr(a, k), flag(k)) for k in keys
            if getattr(a, k, None) is not None}
    if getattr(a, "batch_size", None) is not None:
        check_value("batch_size", a.batch_size, "--batch-size", OPTION_RULES)
    return opts


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
    t.add_argument("--preset", choices=PRESETS, help="default: gpu on a GPU, cpu otherwise (both feature "
                   "space; paper is the paper's pixel-space method)")
    t.add_argument("--config", help="a config.json to start from (e.g. from another run)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.vqvae_epochs=10 (repeatable)")
    t.add_argument("--device", default=None)
    t.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    t.add_argument("--false-alarm-rate", type=float, help="image threshold: rate of good images flagged "
                   "(set on the held-out part of train/good; default 0.01)")
    t.add_argument("--pixel-fpr", type=float, help="pixel threshold: per-pixel false-positive rate on good "
                   "images (default 0.001)")

    c = sub.add_parser("calibrate", parents=[common], help="set a run's image and pixel thresholds again "
                       "(held-out normal images only), e.g. at another false-alarm rate, without retraining")
    c.add_argument("run")
    c.add_argument("--false-alarm-rate", type=float, help="default: the run's (0.01 unless changed)")
    c.add_argument("--pixel-fpr", type=float, help="default: the run's (0.001 unless changed)")
    c.add_argument("--device", default=None)

    e = sub.add_parser("eval", parents=[common], help="evaluate a run on an MVTec AD category's test set")
    e.add_argument("run")
    e.add_argument("data")
    e.add_argument("--out", required=True)
    e.add_argument("--reference-from", choices=("good",), help="also run differential detection (D-MAD): every "
                   "test image against its nearest train/good image (lsr.differential); adds the "
                   "'differential' and 'differential_direct' rows to metrics.json")
    e.add_argument("--max-shift", type=int, help="with --reference-from: registration search radius in model "
                   "pixels (default min(8, image size / 4); 0: no search)")
    e.add_argument("--explain", nargs="?", type=int, const=_RESAMPLED, metavar="N", help="also explain one "
                   "test image per defect type: the prior's attention for its resampled codes (at most 16; or "
                   "its N least likely codes) in OUT/explain/ (lsr.explain)")
    _add_detect_options(e)

    d = sub.add_parser("detect", parents=[common], help="detect anomalies in images")
    d.add_argument("run", help="a run folder (lsr train) or an exported ONNX/TorchScript bundle (lsr-export)")
    d.add_argument("images", nargs="+", help="image files or folders")
    d.add_argument("--out", required=True)
    d.add_argument("--tiff", action="store_true", help="also write raw float32 maps as TIFF")
    d.add_argument("--no-panels", action="store_true", help="skip the PNG panels")
    d.add_argument("--masks", action="store_true", help="also write binary defect masks (PNG, each image's "
                   "own size) of the map above the pixel threshold")
    d.add_argument("--providers", help="bundles only: onnxruntime execution providers in order, e.g. "
                   "cuda,cpu (default: CUDA when it loads, else CPU)")
    d.add_argument("--explain", nargs="?", type=int, const=_RESAMPLED, metavar="N", help="also write the prior's "
                   "attention over earlier codes (per layer, mean over heads) for the resampled codes (at most 16, "
                   "the least likely first), or with N for the N least likely codes: OUT/explain/<stem>_<i>_<j>.png "
                   "and <stem>.npz (lsr.explain)")
    d.add_argument("--reference", metavar="REF", help="also run differential detection (D-MAD) against a "
                   "reference image (or the nearest image of a folder of references): OUT/differential/ "
                   "(lsr.differential)")
    d.add_argument("--max-shift", type=int, help="with --reference: registration search radius in model pixels "
                   "(default min(8, image size / 4); 0: no search)")
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
    try:
        return _main(args)
    except BrokenPipeError:
        # `lsr detect ... | head`: the reader left; every file is written already
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush
    does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _error(prog: str, e: BaseException, debug: bool) -> int:
    """One line on stderr for a failed command: exit 2 for bad input (the message names the
    file or option), 1 for an unexpected failure (a bug: run with --debug and report it)."""
    if debug:
        raise e
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                      PermissionError, NotImplementedError, RuntimeError, ImportError, OSError)):
        msg = str(e)
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"{prog}: error{where}: {msg}", file=sys.stderr)
        return 2
    print(f"{prog}: internal error{where}: {type(e).__name__}: {e} (run with --debug for the traceback, "
          f"and please report it)", file=sys.stderr)
    return 1


def _check_environment() -> None:
    """Environment variables read later (``LSR_CUDA_KERNELS`` at the first CUDA op, which may be
    deep into a training): a bad value is an error now, before any work or any file is written."""
    from .config import read_cuda_kernels_mode   # torch-free: `lsr detect BUNDLE` runs without torch

    read_cuda_kernels_mode()


def _main(args: argparse.Namespace) -> int:
    main_rank = int(os.environ.get("RANK", "0")) == 0       # under torchrun, rank 0 reports
    progress = not args.no_progress and main_rank
    if not main_rank:
        sys.stdout = open(os.devnull, "w")
    try:
        _check_environment()
        if args.command == "train":
            from .training import default_config, train
            from .config import preset as make_preset
            from .io import read_json

            from .data import detect_channels
            from .training import train_images

            paths = train_images(args.data)                  # the folder is listed once
            if args.config:
                cfg = RunConfig.from_dict(read_json(args.config, "--config file"), args.config)
                cfg.detect.tau = None
            elif args.preset:
                cfg = make_preset(args.preset, in_channels=detect_channels(paths))
            else:
                cfg = default_config(args.data, None, args.device, paths)
            if args.set:
                cfg = cfg.with_overrides(_parse_set(args.set))
            rates = {f"detect.{k}": getattr(args, k) for k in ("false_alarm_rate", "pixel_fpr")
                     if getattr(args, k) is not None}
            if rates:
                cfg = cfg.with_overrides(rates, "--false-alarm-rate/--pixel-fpr")
            res = train(args.data, args.out, cfg, device=args.device, progress=progress, overwrite=args.overwrite,
                        images=paths)
            print(f"trained: {res.run} (tau {res.tau:.3g}, held-out prior NLL {res.val_nll:.3f} nats/code)")
        elif args.command == "calibrate":
            from .detect import calibrate_thresholds

            t = calibrate_thresholds(args.run, args.false_alarm_rate, args.pixel_fpr, device=args.device)
            i, p = t["image"], t["pixel"]
            print(f"image threshold {i['threshold']:.4g} for a false-alarm rate of {i['rate']:g} ({i['method']}, "
                  f"{i['n_images']} held-out images, 90% interval {i['ci90'][0]:.4g} .. {i['ci90'][1]:.4g})")
            if i["method"] != "empirical":
                print(f"  note: {i['note']}")
            print(f"pixel threshold {p['threshold']:.4g} for a per-pixel false-positive rate of {p['rate']:g} "
                  f"({p['n_pixels']} held-out pixels)")
            print(f"written: {Path(args.run) / 'config.json'}, {Path(args.run) / 'calibration.json'}")
        elif args.command == "eval":
            from .commands import evaluate
            from .tables import format_table

            top = _check_explain_reference(args)
            r = evaluate(args.run, args.data, args.out, batch_size=args.batch_size, device=args.device,
                         progress=progress, reference_from=args.reference_from, max_shift=args.max_shift,
                         **_detect_options(args))
            print(format_table({k: v for k, v in r["methods"].items()},
                               ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]))
            print(f"metrics: {Path(args.out) / 'metrics.json'}   report: {Path(args.out) / 'report.png'}")
            if args.explain is not None and main_rank:  # under torchrun: rank 0 only
                from .explain import explain_examples

                ex = explain_examples(args.run, args.data, args.out, top=top, device=args.device,
                                      **_detect_options(args))
                print(f"explained: one image per defect type, {sum(len(e['codes']) for e in ex)} code(s), in "
                      f"{Path(args.out) / 'explain'}")
        elif args.command == "detect" and is_bundle(args.run):
            return _detect_bundle(args, progress)
        elif args.command == "detect":
            if args.providers:
                raise ValueError("--providers applies to exported bundles (lsr-export); "
                                 f"{args.run} is a run folder (use --device)")
            from .commands import detect_images

            opts = _detect_options(args)
            top = _check_explain_reference(args)
            rows = detect_images(args.run, args.images, args.out, batch_size=args.batch_size,
                                 device=args.device, save_tiff_maps=args.tiff, panels=not args.no_panels,
                                 progress=progress, masks=args.masks, **opts)
            _print_rows(rows)
            print(f"results: {Path(args.out) / 'results.jsonl'}")
            if args.explain is not None and main_rank:  # under torchrun: rank 0 only
                from .explain import explain_images

                ex = explain_images(args.run, args.images, args.out, top=top, batch_size=args.batch_size,
                                    device=args.device, panels=not args.no_panels, progress=progress, **opts)
                print(f"explained: {sum(len(r['codes']) for r in ex)} code(s) of {len(ex)} image(s) in "
                      f"{Path(args.out) / 'explain'} (index {Path(args.out) / 'explain' / 'explain.jsonl'})")
            if args.reference is not None and main_rank:  # under torchrun: rank 0 only
                from .differential import detect_differential_images

                dr = detect_differential_images(args.run, args.images, args.reference, args.out,
                                                batch_size=args.batch_size, device=args.device,
                                                max_shift=args.max_shift, save_tiff_maps=args.tiff,
                                                panels=not args.no_panels, progress=progress, **opts)
                for r in dr:
                    print(f"{r['image']}: differential score {r['score']:.4f} (direct {r['direct_score']:.4f}) "
                          f"against {r['reference']} (shift dy, dx = {r['shift'][0]}, {r['shift'][1]})")
                print(f"differential: {Path(args.out) / 'differential' / 'results.jsonl'}")
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, categories=args.categories, preset_name=args.preset,
                     overrides=_parse_set(args.set), device=args.device, progress=progress)
        from .distributed import shutdown
        shutdown()
    except KeyboardInterrupt:
        print("lsr: interrupted (training resumes from the last epoch when run again)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as e:                                   # noqa: BLE001 - every failure is one clear line
        return _error("lsr", e, args.debug)
    return 0


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    """A line per detected image (``lsr detect`` of a run or a bundle)."""
    for r in rows:
        later = (f" (later passes evaluated {r['recomputed_fraction']:.0%} of the grid each)"
                 if r.get("recomputed_fraction") is not None else "")
        score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
        verdict = ""
        if r.get("anomalous") is not None:
            verdict = (f"{'REJECT' if r['anomalous'] else 'pass'} (score/threshold "
                       f"{'n/a' if r.get('normalised_score') is None else format(r['normalised_score'], '.2f')}, "
                       f"{r.get('n_regions', 0)} region(s))  ")
        print(f"{r['image']}: {verdict}score {score}  nll {r['nll_score']:.1f}  "
              f"resampled {r['n_resampled']:.0f}  passes {r['prior_passes']}{later}  {r['time_ms']:.0f} ms")


def _check_explain_reference(args: argparse.Namespace) -> int | None:
    """``lsr detect RUN``'s (and ``lsr eval``'s) --explain, --reference and --max-shift checked
    against the run before anything runs; returns the --explain N (None: the resampled codes)."""
    reference = getattr(args, "reference", None)
    if args.max_shift is not None and reference is None and getattr(args, "reference_from", None) is None:
        hint = "--reference-from good" if hasattr(args, "reference_from") else "--reference REF"
        raise ValueError(f"--max-shift: applies to differential detection only (give {hint})")
    top = None if args.explain is None or args.explain is _RESAMPLED else args.explain
    if args.explain is None and reference is None:
        return top
    from .io import read_json

    cfg = RunConfig.from_dict(read_json(Path(args.run) / "config.json", "run config"),
                              str(Path(args.run) / "config.json"))
    if args.explain is not None:
        from .explain import check_top

        check_top(top)
        if not cfg.prior.attention:
            raise ValueError(f"--explain: the prior of {args.run} has no attention layers (prior.attention is false)")
    if reference is not None:
        from .data import list_images
        from .differential import resolve_max_shift

        if not Path(reference).exists():
            raise FileNotFoundError(f"{reference}: --reference: reference image or folder not found")
        list_images([reference])
        resolve_max_shift(args.max_shift, cfg.vqvae.image_size)
    return top


def _detect_bundle(args: argparse.Namespace, progress: bool) -> int:
    """``lsr detect BUNDLE ...``: onnxruntime (or TorchScript) instead of the run's models;
    imports no torch for an ONNX bundle."""
    for given, name in ((args.explain, "--explain"), (args.reference, "--reference"), (args.max_shift, "--max-shift")):
        if given is not None:
            raise ValueError(f"{name}: needs a run folder (lsr train); {args.run} is an exported bundle")
    from .commands import detect_bundle
    from .deploy.runtime import CPU, CUDA, parse_providers

    providers = parse_providers(args.providers)
    if providers is None and args.device:
        providers = [CUDA, CPU] if str(args.device).startswith("cuda") else [CPU]
    rows = detect_bundle(args.run, args.images, args.out, batch_size=args.batch_size, providers=providers,
                         save_tiff_maps=args.tiff, panels=not args.no_panels, progress=progress, masks=args.masks,
                         **_detect_options(args))
    _print_rows(rows)
    print(f"results: {Path(args.out) / 'results.jsonl'}  (bundle {args.run}, "
          f"{', '.join(rows[0]['providers']) if rows else 'no images'})")
    return 0


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsr-export",
        description="Export a trained run to a self-contained bundle of ONNX or TorchScript graphs "
                    "(encoder, prior, decoder, post-processing) plus bundle.json, checked against the "
                    "PyTorch model before it is written. Run a bundle with `lsr detect BUNDLE IMAGES "
                    "--out OUT` or lsr.deploy.Inferencer.",
        epilog="examples:\n  lsr-export runs/bottle --format onnx --out deploy/bottle\n"
               "  lsr-export --check deploy/bottle",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder written by lsr train")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", help="bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--check", metavar="BUNDLE", help="re-run the parity check of an existing bundle "
                   "(against the run recorded in bundle.json, or RUN / --run)")
    p.add_argument("--run", dest="check_run", metavar="RUN", help="with --check: the run folder to compare with")
    p.add_argument("--providers", help="with --check: onnxruntime providers (default cpu)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--check-images", type=int, default=4, help="images of the run's data in the check "
                   "(2 synthetic ones are added)")
    p.add_argument("--tolerance", action="append", default=[], metavar="KIND=VALUE",
                   help="parity tolerance, e.g. logits=1e-3 map=1e-4 (kinds: logits, likelihood, map, score, image)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    g = p.add_argument_group("detection settings to bake in (default: the run's config.json)")
    g.add_argument("--tau", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--restorations", type=int)
    g.add_argument("--map", dest="map_kind", choices=MAP_KINDS)
    g.add_argument("--distance", choices=DISTANCES)
    g.add_argument("--score-distance", choices=("map",) + DISTANCES)
    g.add_argument("--smoothing", choices=[s for s in SMOOTHINGS if s != "bilateral"])
    g.add_argument("--sigma", type=float)
    g.add_argument("--score", choices=SCORES)
    g.add_argument("--topk", type=int)
    g.add_argument("--pool", type=int)
    g.add_argument("--gate-dilate", type=int)
    g.add_argument("--weighting", choices=WEIGHTINGS)
    g.add_argument("--posterior", type=float, help="the posterior draw's strength (> 0 writes a version-4 bundle "
                   "with a code_distances graph; 0 draws from the prior alone; default: the run's)")
    return p


def _parse_tolerance(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        for part in item.replace(",", " ").split():
            key, eq, val = part.partition("=")
            if not eq:
                raise ValueError(f"--tolerance expects KIND=VALUE, got {part!r}")
            try:
                out[key] = Rule("float", 0.0, 1e6, open_lo=True).check(float(val))
            except ValueError as e:
                raise ValueError(f"--tolerance {key}: {e if 'must' in str(e) else f'not a number: {val!r}'}") \
                    from None
    return out


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lsr-export``: export a run to a bundle, or re-check a bundle (exit 1 if the check fails)."""
    args = build_export_parser().parse_args(argv)
    try:
        return _export_main(args)
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _export_main(args: argparse.Namespace) -> int:
    try:
        _check_environment()
        tol = _parse_tolerance(args.tolerance)
        _detect_options(args)                                 # the baked-in settings, checked by flag
        check_value("check_images", args.check_images, "--check-images", OPTION_RULES)
        if args.check:
            from .deploy import check_bundle
            from .deploy.runtime import parse_providers

            report = check_bundle(args.check, args.check_run or args.run, n_images=args.check_images,
                                  tolerance=tol or None,
                                  providers=parse_providers(args.providers) or ["CPUExecutionProvider"])
            print(report.summary())
            return 0 if report.passed else 1
        if not args.run or not args.out:
            raise ValueError("give a run folder and --out (or --check BUNDLE)")
        from .deploy import export_bundle
        from .deploy.export import DEFAULT_OPSET

        from .deploy.bundle import EXPORTED_OPTIONS

        res = export_bundle(args.run, args.out, args.format, check=not args.no_check, overwrite=args.overwrite,
                            opset=args.opset or DEFAULT_OPSET,
                            options={k: getattr(args, k) for k in EXPORTED_OPTIONS},
                            tolerance=tol or None, check_images=args.check_images,
                            log=lambda m: print(m, file=sys.stderr))
        print(f"bundle: {res.bundle} ({res.format}{'' if res.parity else ', not checked'})")
    except KeyboardInterrupt:
        print("lsr-export: interrupted; no bundle written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as e:                                   # noqa: BLE001 - every failure is one clear line
        return _error("lsr-export", e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
