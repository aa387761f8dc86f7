"""Draw samples from a trained flow at a temperature (z ~ N(0, T^2 I), Glow sec. 5).

The output format follows the file name: .png (image grid, or a scatter for 2-D data), .npy
(numpy array) or .pt (torch tensor). Arrays hold data units: integer levels for discrete data
(NaN where a sample was not finite), raw values for continuous data; --space model keeps the
model-space values (the dequantised scale v in [0, 1)). Without --out the file goes next to the
checkpoint as samples-<checkpoint>-step<N>-T<T>-n<n>-seed<s>.png (the name fixes its contents);
an existing --out FILE is refused unless --overwrite.

Examples:
  stableflows sample runs/demo --n 64 --temperature 0.7
  stableflows sample runs/demo --n 64 --temperature 0.7 --out samples.png
  stableflows sample runs/demo/best.pt --n 1000 --out samples.npy
"""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "sample"
HELP = "draw samples from a trained flow (.png grid, .npy or .pt)"
FORMATS = (".png", ".npy", ".pt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CKPT",
                        help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--n", type=int, default=64, metavar="N", help="number of samples (default: 64)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="standard deviation of the latent Gaussian (default: 1.0)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file: .png, .npy or .pt (default: samples-<checkpoint>-step<N>-T<T>-n<n>-seed<s>"
                             ".png next to the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draw (default: 0)")
    parser.add_argument("--space", choices=("data", "model"), default="data",
                        help="data: integer levels for discrete data; model: values the flow sees (default: data)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import io
    import math

    import numpy as np
    import torch

    from ..config import ConfigError
    from ..train import plots
    from ..train.checkpoint import atomic_write_bytes, resolve_checkpoint
    from ..train.evaluate import draw_samples, load_flow, quantize
    from ..train.loop import resolve_device

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in FORMATS:
        raise ConfigError(f"--out must end in {', '.join(FORMATS)}, got {out.name!r}")
    if out is not None and out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or choose another file")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    path = resolve_checkpoint(args.run)
    flow, ckpt = load_flow(path, map_location=resolve_device(args.device))
    if out is None:
        space = "-model" if args.space == "model" else ""
        out = path.parent / (f"samples-{path.stem}-step{ckpt.get('step')}-T{args.temperature:g}-n{args.n}"
                             f"-seed{args.seed}{space}.png")
    shape, levels = tuple(ckpt["shape"]), ckpt.get("levels")
    img = plots.image_shape(shape) if levels is not None else None
    if out.suffix == ".png" and img is None and shape != (2,):
        raise ConfigError(f"cannot draw data of shape {shape} as a PNG; use .npy or .pt")
    v = draw_samples(flow, args.n, args.temperature, seed=args.seed).cpu()  # (n, *shape)
    n_bad = int((~torch.isfinite(v)).flatten(1).any(dim=1).sum())
    if out.suffix == ".png":
        if img is not None:
            images, _ = plots.to_unit_images(v, img)
            plots.save_sample_grid(out, {f"T = {args.temperature}": images})
        else:
            plots.save_scatter(out, {f"samples, T = {args.temperature}": v})
    else:
        data = quantize(v, levels) if levels is not None and args.space == "data" else v
        buf = io.BytesIO()
        if out.suffix == ".npy":
            np.save(buf, data.numpy())
        else:
            torch.save(data, buf)
        atomic_write_bytes(out, buf.getvalue())
    print(f"{args.n} samples at temperature {args.temperature} -> {out}"
          + (f" ({n_bad} non-finite)" if n_bad else ""))
    return 0
