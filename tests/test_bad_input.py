"""Bad input, as a demanding user (or an attacker) would give it, to ``lsr train / eval /
detect / demo`` and ``lsr-export``: every case must end with exit status 2, one line on
stderr that names the file or the option, no traceback, and everything that existed
before the command (a finished run, earlier results, a bystander file) byte-identical
after it. The C++ runtime's cases are in tests/test_cpp_runtime.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lsr.cli import export_main, main


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))          # NaN becomes the literal NaN, as a careless editor writes it


def set_key(path: Path, dotted: str, value) -> None:
    def fn(d):
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    edit_json(path, fn)


def del_key(path: Path, dotted: str) -> None:
    def fn(d):
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    edit_json(path, fn)


def copy_category(src: Path, dst: Path, drop: int = 0) -> Path:
    """An MVTec-layout copy of a category (train/good only, minus ``drop`` images)."""
    good = dst / "train" / "good"
    good.mkdir(parents=True)
    files = sorted((src / "train" / "good").glob("*.png"))
    for f in files[:len(files) - drop]:
        shutil.copy(f, good / f.name)
    return dst


@pytest.fixture(scope="module")
def onnx_bundle(tiny_run, tmp_path_factory):
    from lsr.deploy.export import export_bundle

    out = tmp_path_factory.mktemp("bad-input-bundle") / "b"
    export_bundle(tiny_run, out, "onnx", check=False, log=lambda *_: None)
    return out


@pytest.fixture
def w(tmp_path, tiny_run, tiny_dataset, onnx_bundle):
    """A world to damage: a finished run, an earlier results folder, a bundle, a bystander."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.jsonl").write_text('{"image": "earlier.png", "score": 1.0}\n')
    (tmp_path / "bystander.txt").write_text("not lsr's")
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    image = next((tiny_dataset / "test").rglob("*.png"))
    return SimpleNamespace(root=tmp_path, run=run, data=tiny_dataset, results=results, bundle=bundle, image=image,
                           file=tmp_path / "bystander.txt", cfg=run / "config.json")


def png(path: Path, size=(32, 32), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def truncated_png(path: Path, like: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = like.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def data_with(w, name: str, maker) -> Path:
    """A copy of the training images plus one bad file made by ``maker(path)``."""
    d = copy_category(w.data, w.root / "baddata")
    maker(d / "train" / "good" / name)
    return d


def mixed_folder(w) -> Path:
    """Good test images, then two unreadable files last in name order (the batch of one makes
    every good image before them a finished detection, were they not checked first)."""
    d = w.root / "mixed"
    d.mkdir()
    for i, f in enumerate(sorted((w.data / "test").rglob("*.png"))[:3]):
        shutil.copy(f, d / f"a{i}.png")
    (d / "zz_text.png").write_text("not an image")
    (d / "zz_empty.png").write_bytes(b"")
    return d


def config_with(w, dotted: str, value) -> Path:
    p = w.root / "cfg.json"
    shutil.copy(w.cfg, p)
    set_key(p, dotted, value)
    return p


def huge_png(path: Path) -> Path:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        Image.new("1", (20000, 20000), 0).save(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return path


def damage_tensor_bytes(path: Path) -> None:
    """Overwrite the tensor bytes of a safetensors file, keeping its header intact."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n
    raw[start:] = b"\xff" * (len(raw) - start)           # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(raw))


def nan_weights_without_manifest(w) -> None:
    from safetensors.torch import load_file, save_file

    (w.run / "lsr_run.json").unlink()
    state = load_file(str(w.run / "prior.safetensors"))
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k] = state[k].clone().fill_(float("nan"))
    save_file(state, str(w.run / "prior.safetensors"))


def unfinished_with_checkpoint(w, field, value) -> None:
    """Make the run unfinished (tau null) and damage a checkpoint's JSON."""
    set_key(w.cfg, "detect.tau", None)
    set_key(w.run / "checkpoints" / "vqvae_state.json", field, value)


TRAIN = ["--no-progress", "train"]
EVAL = ["--no-progress", "eval"]
DETECT = ["--no-progress", "detect"]

# (id, setup(w) -> extra info or None, argv(w) -> list, names that the message must contain)
CASES = [
    # --- training options and --set
    ("set-epochs-negative", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                     "--set", "train.vqvae_epochs=-3"], ["train.vqvae_epochs"]),
    ("set-epochs-abc", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                "--set", "train.vqvae_epochs=abc"], ["train.vqvae_epochs", "abc"]),
    ("set-epochs-float", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                  "--set", "train.vqvae_epochs=2.5"], ["train.vqvae_epochs"]),
    ("set-unknown-key", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                 "--set", "nope.key=1"], ["nope.key"]),
    ("set-no-equals", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                               "--set", "train.seed"], ["--set"]),
    ("set-val-fraction", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                  "--set", "train.val_fraction=1.5"], ["train.val_fraction"]),
    ("set-batch-zero", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                "--set", "train.batch_size=0"], ["train.batch_size"]),
    ("set-kernel-even", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                 "--set", "prior.kernel_size=4"], ["prior.kernel_size"]),
    ("set-image-size-odd", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                    "--set", "vqvae.image_size=33"], ["image_size"]),
    ("set-lr-nan", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                            "--set", "train.vqvae_lr=NaN"], ["train.vqvae_lr"]),
    ("set-seed-negative", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                   "--set", "train.seed=-5"], ["train.seed"]),
    ("set-flip-string", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                 "--set", "train.hflip=maybe"], ["train.hflip"]),
    ("set-heads-divide", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny",
                                                  "--set", "prior.n_heads=3"], ["n_heads"]),
    ("set-backbone-missing", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny-features",
                                                      "--set", "vqvae.backbone_weights=/nope.pth"], ["/nope.pth"]),
    ("set-score-distance-not-for-features", None,
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "tiny-features", "--set",
                        "detect.score_distance=ssim"], ["detect.score_distance", "ssim"]),
    ("preset-unknown", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--preset", "nope"], ["--preset"]),
    # --- --config files
    ("config-binary", lambda w: (w.root / "bin.json").write_bytes(b"\x89PNG\xff\xfe\x00"),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "bin.json"], ["bin.json"]),
    ("config-missing", None, lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "no.json"],
     ["no.json"]),
    ("config-image-size-string", lambda w: config_with(w, "vqvae.image_size", "32"),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "cfg.json"], ["cfg.json",
                                                                                             "vqvae.image_size"]),
    ("config-channels-float", lambda w: config_with(w, "vqvae.channels", 16.5),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "cfg.json"], ["cfg.json",
                                                                                             "vqvae.channels"]),
    ("config-negative-size", lambda w: config_with(w, "prior.channels", -16),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "cfg.json"], ["cfg.json",
                                                                                             "prior.channels"]),
    ("config-unknown-key", lambda w: config_with(w, "train.colour", 1),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "cfg.json"], ["cfg.json", "colour"]),
    ("config-list", lambda w: (w.root / "list.json").write_text("[1, 2]"),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "list.json"], ["list.json"]),
    ("config-section-not-object", lambda w: config_with(w, "train", 3),
     lambda w: TRAIN + [w.data, "--out", w.root / "new", "--config", w.root / "cfg.json"], ["cfg.json", "train"]),
    # --- training data
    ("data-missing", None, lambda w: TRAIN + [w.root / "nodata", "--out", w.root / "new", "--preset", "tiny"],
     ["nodata"]),
    ("data-empty", lambda w: (w.root / "empty").mkdir(),
     lambda w: TRAIN + [w.root / "empty", "--out", w.root / "new", "--preset", "tiny"], ["empty"]),
    ("data-truncated", lambda w: data_with(w, "zz_cut.png", lambda p: truncated_png(p, w.image)),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.root / "new", "--preset", "tiny"], ["zz_cut.png"]),
    ("data-text-as-png", lambda w: data_with(w, "zz_text.png", lambda p: p.write_text("hello")),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.root / "new", "--preset", "tiny"], ["zz_text.png"]),
    ("data-huge", lambda w: data_with(w, "zz_huge.png", huge_png),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.root / "new", "--preset", "tiny"], ["zz_huge.png", "large"]),
    ("data-empty-file", lambda w: data_with(w, "zz_empty.png", lambda p: p.write_bytes(b"")),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.root / "new", "--preset", "tiny"], ["zz_empty.png"]),
    # --- the run folder
    ("train-other-data-into-finished-run", lambda w: copy_category(w.data, w.root / "other", drop=2),
     lambda w: TRAIN + [w.root / "other", "--out", w.run, "--preset", "tiny"], [str("run"), "other images"]),
    ("train-bad-image-into-finished-run", lambda w: data_with(w, "zz_cut.png", lambda p: truncated_png(p, w.image)),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.run, "--preset", "tiny"], ["zz_cut.png"]),
    ("overwrite-bad-image-new-config", lambda w: data_with(w, "zz_cut.png", lambda p: truncated_png(p, w.image)),
     lambda w: TRAIN + [w.root / "baddata", "--out", w.run, "--preset", "tiny", "--overwrite",
                        "--set", "train.seed=3"], ["zz_cut.png"]),
    ("overwrite-foreign-folder", lambda w: (w.root / "mine").mkdir() or (w.root / "mine" / "thesis.tex").write_text("x"),
     lambda w: TRAIN + [w.data, "--out", w.root / "mine", "--preset", "tiny", "--overwrite"],
     ["mine", "not an lsr run"]),
    ("train-into-foreign-folder", lambda w: (w.root / "mine").mkdir() or (w.root / "mine" / "thesis.tex").write_text("x"),
     lambda w: TRAIN + [w.data, "--out", w.root / "mine", "--preset", "tiny"], ["mine", "not an lsr run"]),
    ("train-out-is-file", None, lambda w: TRAIN + [w.data, "--out", w.file, "--preset", "tiny"], ["bystander.txt"]),
    ("train-other-config", None, lambda w: TRAIN + [w.data, "--out", w.run, "--preset", "tiny",
                                                    "--set", "train.seed=7"], ["different configuration"]),
    ("checkpoint-tensors-escape", lambda w: unfinished_with_checkpoint(w, "tensors", "../../x.pt"),
     lambda w: TRAIN + [w.data, "--out", w.run, "--preset", "tiny"], ["vqvae_state.json", "../../x.pt"]),
    ("checkpoint-tensors-absolute", lambda w: unfinished_with_checkpoint(w, "tensors", "/etc/passwd"),
     lambda w: TRAIN + [w.data, "--out", w.run, "--preset", "tiny"], ["vqvae_state.json", "/etc/passwd"]),
    ("checkpoint-info-damaged", lambda w: unfinished_with_checkpoint(w, "info", [1, 2]),
     lambda w: TRAIN + [w.data, "--out", w.run, "--preset", "tiny"], ["vqvae_state.json"]),
    # --- a run's files, read by eval and detect
    ("run-missing", None, lambda w: DETECT + [w.root / "norun", w.image, "--out", w.results], ["norun"]),
    ("run-config-tau-nan", lambda w: set_key(w.cfg, "detect.tau", float("nan")),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "detect.tau"]),
    ("run-config-tau-null", lambda w: set_key(w.cfg, "detect.tau", None),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "tau"]),
    ("run-unfinished", lambda w: set_key(w.run / "lsr_run.json", "finished", False),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["lsr_run.json", "did not finish"]),
    ("run-config-tau-negative", lambda w: set_key(w.cfg, "detect.tau", -0.1),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "detect.tau"]),
    ("run-config-image-size-string", lambda w: set_key(w.cfg, "vqvae.image_size", "32"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "vqvae.image_size"]),
    ("run-config-restorations-huge", lambda w: set_key(w.cfg, "detect.restorations", 1e12),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "detect.restorations"]),
    ("run-config-score-mean-string", lambda w: set_key(w.cfg, "detect.score_mean", "x"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json", "detect.score_mean"]),
    ("run-config-not-json", lambda w: w.cfg.write_text("{tau: 1"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json"]),
    ("run-config-missing", lambda w: w.cfg.unlink(),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["config.json"]),
    ("run-weights-bytes-overwritten", lambda w: damage_tensor_bytes(w.run / "vqvae.safetensors"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["vqvae.safetensors"]),
    ("run-weights-truncated", lambda w: (w.run / "prior.safetensors").write_bytes(b"\x08\x00"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["prior.safetensors"]),
    ("run-weights-nan-no-manifest", nan_weights_without_manifest,
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["prior.safetensors", "non-finite"]),
    ("run-weights-missing", lambda w: (w.run / "prior.safetensors").unlink(),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["prior.safetensors"]),
    ("run-manifest-damaged", lambda w: (w.run / "lsr_run.json").write_text("[]"),
     lambda w: DETECT + [w.run, w.image, "--out", w.results], ["lsr_run.json"]),
    ("run-is-file", None, lambda w: DETECT + [w.file, w.image, "--out", w.results], ["bystander.txt"]),
    # --- detect options
    ("detect-batch-negative", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--batch-size", "-1"],
     ["--batch-size"]),
    ("detect-batch-zero", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--batch-size", "0"],
     ["--batch-size"]),
    ("detect-tau-negative", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--tau", "-1"], ["--tau"]),
    ("detect-tau-nan", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--tau", "nan"], ["--tau"]),
    ("detect-tau-one", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--tau", "1.5"], ["--tau"]),
    ("detect-sigma-negative", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--sigma", "-3"],
     ["--sigma"]),
    ("detect-sigma-nan", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--sigma", "nan"], ["--sigma"]),
    ("detect-topk-zero", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--topk", "0",
                                                   "--score", "topk_mean"], ["--topk"]),
    ("detect-restorations-zero", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--restorations", "0"],
     ["--restorations"]),
    ("detect-restorations-huge", None, lambda w: DETECT + [w.run, w.image, "--out", w.results,
                                                           "--restorations", "1000000"], ["--restorations"]),
    ("detect-temperature-zero", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--temperature", "0"],
     ["--temperature"]),
    ("detect-temperature-inf", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--temperature", "inf"],
     ["--temperature"]),
    ("detect-seed-negative", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--seed", "-5"],
     ["--seed"]),
    ("detect-pool-zero", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--pool", "0"], ["--pool"]),
    ("detect-gate-negative", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--gate-dilate", "-1"],
     ["--gate-dilate"]),
    ("detect-batch-abc", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--batch-size", "abc"],
     ["--batch-size"]),
    ("detect-map-unknown", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--map", "nope"], ["--map"]),
    ("detect-distance-for-pixels", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--distance",
                                                             "cosine"], ["distance"]),
    ("detect-out-is-file", None, lambda w: DETECT + [w.run, w.image, "--out", w.file], ["bystander.txt"]),
    ("detect-out-below-file", None, lambda w: DETECT + [w.run, w.image, "--out", w.file / "sub"], ["bystander.txt"]),
    ("detect-image-missing", None, lambda w: DETECT + [w.run, w.root / "nope.png", "--out", w.results], ["nope.png"]),
    ("detect-image-text", lambda w: (w.root / "fake.png").write_text("no image"),
     lambda w: DETECT + [w.run, w.root / "fake.png", "--out", w.results], ["fake.png"]),
    ("detect-image-huge", lambda w: huge_png(w.root / "huge.png"),
     lambda w: DETECT + [w.run, w.root / "huge.png", "--out", w.results], ["huge.png"]),
    ("detect-folder-two-unreadable-last", mixed_folder,
     lambda w: DETECT + [w.run, w.root / "mixed", "--out", w.results, "--batch-size", "1"],
     ["zz_empty.png", "zz_text.png", "2 of 5 images"]),
    ("bundle-folder-two-unreadable-last", mixed_folder,
     lambda w: DETECT + [w.bundle, w.root / "mixed", "--out", w.results, "--batch-size", "1"],
     ["zz_empty.png", "zz_text.png", "2 of 5 images"]),
    ("detect-providers-on-run", None, lambda w: DETECT + [w.run, w.image, "--out", w.results, "--providers", "cpu"],
     ["--providers"]),
    # --- eval
    ("eval-out-is-file", None, lambda w: EVAL + [w.run, w.data, "--out", w.file], ["bystander.txt"]),
    ("eval-no-test", lambda w: copy_category(w.data, w.root / "notest"),
     lambda w: EVAL + [w.run, w.root / "notest", "--out", w.results], ["test"]),
    ("eval-tau-nan", None, lambda w: EVAL + [w.run, w.data, "--out", w.results, "--tau", "nan"], ["--tau"]),
    ("eval-topk-zero", None, lambda w: EVAL + [w.run, w.data, "--out", w.results, "--topk", "0"], ["--topk"]),
    ("eval-config-tau-nan", lambda w: set_key(w.cfg, "detect.tau", float("nan")),
     lambda w: EVAL + [w.run, w.data, "--out", w.results], ["config.json", "detect.tau"]),
    # --- bundles
    ("bundle-tau-nan", lambda w: set_key(w.bundle / "bundle.json", "detect.tau", float("nan")),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "detect.tau"]),
    ("bundle-no-image-size", lambda w: del_key(w.bundle / "bundle.json", "model.image_size"),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "model.image_size"]),
    ("bundle-graphs-empty-list", lambda w: set_key(w.bundle / "bundle.json", "graphs", []),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "graphs"]),
    ("bundle-restorations-huge", lambda w: set_key(w.bundle / "bundle.json", "detect.restorations", 1e12),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "detect.restorations"]),
    ("bundle-graph-escape", lambda w: set_key(w.bundle / "bundle.json", "graphs.prior.file", "../prior.onnx"),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "../prior.onnx"]),
    ("bundle-not-json", lambda w: (w.bundle / "bundle.json").write_text("{"),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json"]),
    ("bundle-seed-string", lambda w: set_key(w.bundle / "bundle.json", "detect.seed", "x"),
     lambda w: DETECT + [w.bundle, w.image, "--out", w.results], ["bundle.json", "detect.seed"]),
    ("bundle-detect-tau-option", None, lambda w: DETECT + [w.bundle, w.image, "--out", w.results, "--tau", "nan"],
     ["--tau"]),
    ("bundle-batch-zero", None, lambda w: DETECT + [w.bundle, w.image, "--out", w.results, "--batch-size", "0"],
     ["--batch-size"]),
    ("bundle-out-is-file", None, lambda w: DETECT + [w.bundle, w.image, "--out", w.file], ["bystander.txt"]),
    # --- demo
    ("demo-out-is-file", None, lambda w: ["--no-progress", "demo", "--out", w.file], ["bystander.txt"]),
    ("demo-set-negative", None, lambda w: ["--no-progress", "demo", "--out", w.root / "demo",
                                           "--set", "train.vqvae_epochs=-1"], ["train.vqvae_epochs"]),
    ("demo-category-unknown", None, lambda w: ["--no-progress", "demo", "--out", w.root / "demo",
                                               "--categories", "nope"], ["nope"]),
]

EXPORT_CASES = [
    ("export-tau-nan", None, lambda w: [w.run, "--out", w.root / "b2", "--tau", "nan"], ["--tau"]),
    ("export-restorations-zero", None, lambda w: [w.run, "--out", w.root / "b2", "--restorations", "0"],
     ["--restorations"]),
    ("export-config-tau-nan", lambda w: set_key(w.cfg, "detect.tau", float("nan")),
     lambda w: [w.run, "--out", w.root / "b2"], ["config.json", "detect.tau"]),
    ("export-tolerance-abc", None, lambda w: [w.run, "--out", w.root / "b2", "--tolerance", "logits=abc"],
     ["--tolerance"]),
    ("export-tolerance-negative", None, lambda w: [w.run, "--out", w.root / "b2", "--tolerance", "logits=-1"],
     ["--tolerance"]),
    ("export-check-images-negative", None, lambda w: [w.run, "--out", w.root / "b2", "--check-images", "-1"],
     ["--check-images"]),
    ("export-out-is-file", None, lambda w: [w.run, "--out", w.file], ["bystander.txt"]),
    ("export-check-tau-nan", lambda w: set_key(w.bundle / "bundle.json", "detect.tau", float("nan")),
     lambda w: ["--check", w.bundle, "--run", w.run], ["bundle.json", "detect.tau"]),
    ("export-run-missing", None, lambda w: [w.root / "norun", "--out", w.root / "b2"], ["norun"]),
]


def _run_case(w, capsys, setup, argv, names, entry):
    if setup is not None:
        setup(w)
    capsys.readouterr()
    before = snapshot(w.root)
    try:
        rc = entry([str(a) for a in argv(w)])
    except SystemExit as e:                       # argparse's own errors exit 2 with usage
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    for name in names:
        assert str(name) in err, f"{name!r} not named in: {err}"
    after = snapshot(w.root)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"changed or removed by a failed command: {changed}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_lsr(w, capsys, case):
    _, setup, argv, names = case
    _run_case(w, capsys, setup, argv, names, main)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_bad_input_export(w, capsys, case):
    _, setup, argv, names = case
    _run_case(w, capsys, setup, argv, names, export_main)


def test_suite_size():
    """The issue asks for at least 80 cases (with the C++ runtime's, tests/test_cpp_runtime.py)."""
    assert len(CASES) + len(EXPORT_CASES) >= 80


# ------------------------------------------------------------------ beyond a single bad flag


@pytest.mark.parametrize("api", ["explain", "differential"])
def test_python_api_names_unreadable_images_before_any_output(w, api):
    """The Python API, not only `lsr detect`, names every unreadable input before it writes:
    explain_images and detect_differential_images list their inputs through list_images."""
    from lsr.data import DataError
    from lsr.differential import detect_differential_images
    from lsr.explain import explain_images

    d = mixed_folder(w)
    out = w.root / "api-out"
    with pytest.raises(DataError) as e:
        if api == "explain":
            explain_images(w.run, [d], out, batch_size=1, progress=False)
        else:
            detect_differential_images(w.run, [d], w.image, out, batch_size=1, progress=False)
    assert all(s in str(e.value) for s in ("zz_empty.png", "zz_text.png", "2 of 5 images"))
    assert not [p for p in out.rglob("*") if p.suffix in (".png", ".npz", ".jsonl", ".tiff")]

def test_second_command_on_a_locked_folder_refuses(w, capsys):
    from lsr.io import folder_lock

    before = snapshot(w.root)
    with folder_lock(w.results):
        rc = main(["--no-progress", "detect", str(w.run), str(w.image), "--out", str(w.results)])
    err = capsys.readouterr().err
    assert rc == 2 and "another lsr command is writing into this folder" in err and str(w.results) in err
    assert snapshot(w.root) == before
    assert main(["--no-progress", "detect", str(w.run), str(w.image), "--out", str(w.results)]) == 0  # released


def test_outputs_honour_the_umask(w):
    old = os.umask(0o022)
    try:
        assert main(["--no-progress", "detect", str(w.run), str(w.image), "--out", str(w.root / "o")]) == 0
    finally:
        os.umask(old)
    for name in ("results.jsonl", f"{w.image.stem}.png"):
        assert stat.S_IMODE((w.root / "o" / name).stat().st_mode) == 0o644, name


def test_results_jsonl_never_holds_nan(w, monkeypatch):
    """A fused score without held-out statistics is null in results.jsonl, never NaN."""
    import lsr.detect as D

    monkeypatch.setattr(D, "with_held_out_stats", lambda det, run: det)
    assert main(["--no-progress", "detect", str(w.run), str(w.image), "--out", str(w.root / "o"),
                 "--score", "fused", "--sigma", "3"]) == 0
    text = (w.root / "o" / "results.jsonl").read_text()
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.jsonl"))
    assert row["fused_score"] is None


def test_non_finite_map_is_an_error(w, capsys, monkeypatch):
    """Finite but broken weights that make a NaN map (here: a decoder output of NaN) are an
    error naming the image, never a NaN score with exit 0."""
    import lsr.detect as D

    real = D.Detector.decode_image
    monkeypatch.setattr(D.Detector, "decode_image", lambda self, c: real(self, c) * float("nan"))
    rc = main(["--no-progress", "detect", str(w.run), str(w.image), "--out", str(w.results)])
    err = capsys.readouterr().err
    assert rc == 2 and w.image.name in err and "not finite" in err
    assert (w.results / "results.jsonl").read_text().startswith('{"image": "earlier.png"')


def test_broken_pipe_ends_quietly(w):
    images = sorted(str(p) for p in (w.data / "test").rglob("*.png"))
    p = subprocess.Popen([sys.executable, "-m", "lsr", "--no-progress", "detect", str(w.run), *images,
                          "--out", str(w.root / "o"), "--no-panels"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                               # the reader (`| head`) is gone before anything is printed
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert len((w.root / "o" / "results.jsonl").read_text().splitlines()) == len(images)


def test_overwrite_removes_only_lsrs_files(w, tiny_dataset):
    (w.run / "notes.txt").write_text("mine")
    (w.run / "checkpoints" / "my.ckpt").write_text("mine too")
    rc = main(["--no-progress", "train", str(tiny_dataset), "--out", str(w.run), "--preset", "tiny",
               "--set", "train.seed=3", "--set", "train.prior_epochs=1", "--set", "train.vqvae_epochs=1",
               "--overwrite"])
    assert rc == 0
    assert (w.run / "notes.txt").read_text() == "mine"
    assert (w.run / "checkpoints" / "my.ckpt").read_text() == "mine too"
    cfg = json.loads((w.run / "config.json").read_text())
    assert cfg["train"]["seed"] == 3 and cfg["detect"]["tau"] is not None


def test_weights_hashes_recorded_and_checked(w):
    from lsr.io import sha256_file

    m = json.loads((w.run / "lsr_run.json").read_text())
    assert m["finished"] is True and set(m["weights"]) == {"vqvae.safetensors", "prior.safetensors"}
    for name, digest in m["weights"].items():
        assert sha256_file(w.run / name) == digest
    assert m["data"]["n_images"] == len(list((w.data / "train" / "good").glob("*.png")))


def test_eval_does_not_need_train_good(w, tiny_dataset):
    d = w.root / "testonly"
    shutil.copytree(tiny_dataset / "test", d / "test")
    shutil.copytree(tiny_dataset / "ground_truth", d / "ground_truth")
    assert main(["--no-progress", "eval", str(w.run), str(d), "--out", str(w.root / "e")]) == 0


def test_resumed_training_logs_each_epoch_once(tmp_path, tiny_dataset, monkeypatch):
    """Interrupted after logging an epoch but before checkpointing it, then resumed: the
    log holds each (stage, epoch) once."""
    import lsr
    import lsr.training as T

    cfg = lsr.preset("tiny", in_channels=1).with_overrides({"train.prior_epochs": 3})
    real = T.save_training_state
    calls = {"prior": 0}

    def flaky(path, *a, **k):
        if Path(path).name == "prior_state":
            calls["prior"] += 1
            if calls["prior"] == 2:                      # epoch 1 is logged, its checkpoint is not written
                raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(T, "save_training_state", flaky)
    with pytest.raises(KeyboardInterrupt):
        lsr.train(tiny_dataset, tmp_path / "run", cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(T, "save_training_state", real)
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["stage"] == "prior"] == [0, 1]     # the duplicate-to-be is there
    lsr.train(tiny_dataset, tmp_path / "run", cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["epoch"]) for r in rows if "epoch" in r]
    assert len(keys) == len(set(keys)), keys
    assert [e for s, e in keys if s == "prior"] == [0, 1, 2]


def test_rules_table_covers_every_config_field():
    import dataclasses

    from lsr.config import RULES, DetectConfig, PriorConfig, TrainConfig, VQVAEConfig, rules_table

    for section, cls in (("vqvae", VQVAEConfig), ("prior", PriorConfig), ("train", TrainConfig),
                         ("detect", DetectConfig)):
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in RULES, f"{section}.{f.name} has no rule"
    assert "detect.tau" in rules_table()


@pytest.mark.parametrize("key,good,bad", [
    ("detect.tau", [1e-9, 0.5], [0.0, 1.0, -1, math.nan, math.inf, "0.1", True, []]),
    ("detect.restorations", [1, 64], [0, 65, 1.0, 1e12, "2"]),
    ("vqvae.downsample", [2, 16], [3, 0, 1, 12]),
    ("prior.kernel_size", [3, 5], [2, 4, 1]),
    ("train.vqvae_epochs", [0, 10], [-1, 2.5, "abc"]),
    ("detect.sigma", [0.0, 4], [-3, math.nan]),
    ("train.hflip", [True, False], [1, "true"]),
])
def test_rule_checks(key, good, bad):
    from lsr.config import ConfigError, check_value

    for v in good:
        check_value(key, v)
    for v in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_value(key, v)



def test_readme_prints_the_rules():
    """README "Valid values and bad input" holds the rules table as lsr.config prints it."""
    from lsr.config import rules_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert rules_table() in readme
