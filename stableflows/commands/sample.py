"""Draw samples from a trained flow at a temperature (z ~ N(0, T^2 I), Glow sec. 5).

The output format follows the file name: .png (image grid, or a scatter for 2-D data), .npy
(numpy array) or .pt (torch tensor). Arrays hold data units: integer levels for discrete data
(NaN where a sample was not finite), raw values for continuous data; --space model keeps the
model-space values (the dequantised scale v in [0, 1)).

Examples:
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
    parser.add_argument("--out", default="samples.png", metavar="FILE",
                        help="output file: .png, .npy or .pt (default: samples.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draw (default: 0)")
    parser.add_argument("--space", choices=("data", "model"), default="data",
                        help="data: integer levels for discrete data; model: values the flow sees (default: data)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..config import ConfigError
    from ..train import plots
    from ..train.evaluate import draw_samples, load_flow, quantize
    from ..train.loop import resolve_device

    out = Path(args.out)
    if out.suffix not in FORMATS:
        raise ConfigError(f"--out must end in {', '.join(FORMATS)}, got {out.name!r}")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    flow, ckpt = load_flow(args.run, map_location=resolve_device(args.device))
    shape, levels = tuple(ckpt["shape"]), ckpt.get("levels")
    img = plots.image_shape(shape) if levels is not None else None
    if out.suffix == ".png" and img is None and shape != (2,):
        raise ConfigError(f"cannot draw data of shape {shape} as a PNG; use .npy or .pt")
    v = draw_samples(flow, args.n, args.temperature, seed=args.seed).cpu()  # (n, *shape)
    n_bad = int((~torch.isfinite(v)).flatten(1).any(dim=1).sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        if img is not None:
            images, _ = plots.to_unit_images(v, img)
            plots.save_sample_grid(out, {f"T = {args.temperature}": images})
        else:
            plots.save_scatter(out, {f"samples, T = {args.temperature}": v})
    else:
        data = quantize(v, levels) if levels is not None and args.space == "data" else v
        if out.suffix == ".npy":
            np.save(out, data.numpy())
        else:
            torch.save(data, out)
    print(f"{args.n} samples at temperature {args.temperature} -> {out}"
          + (f" ({n_bad} non-finite)" if n_bad else ""))
    return 0
