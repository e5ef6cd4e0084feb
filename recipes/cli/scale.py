"""``effnetv2 scale BASE --out DIR``: grow a base network into a family, as the paper grows S into M and L.

    effnetv2 scale runs/search/best.json --out runs/family --phis 1,2,3
    effnetv2 scale efficientnetv2-demo --out runs/demo-family --max-size 96

BASE is a model name, a model config file, or a search folder (its ``best.json``). Each member is written
as ``DIR/<name>.json`` (train it with ``--set model=DIR/<name>.json``) and a table of sizes, layers,
parameters and FLOPs is printed. The rules (compound coefficients, size cap, deeper last stages) are in
:mod:`effnetv2.model.search.scaling`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effnetv2.model.search import Compound

_D = Compound()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="model name, model config file (.json), or a search folder (its best.json)")
    p.add_argument("--out", required=True, help="folder for the members' config files")
    p.add_argument("--phis", default="1,2,3", help="compound coefficients, comma-separated (default 1,2,3)")
    p.add_argument("--alpha", type=float, default=_D.alpha, help=f"depth per unit of phi (default {_D.alpha})")
    p.add_argument("--beta", type=float, default=_D.beta, help=f"width per unit of phi (default {_D.beta})")
    p.add_argument("--gamma", type=float, default=_D.gamma, help=f"image size per unit of phi (default {_D.gamma})")
    p.add_argument("--late-depth", type=float, default=_D.late_depth,
                   help=f"extra depth per unit of phi in the last stages (default {_D.late_depth})")
    p.add_argument("--late-stages", type=int, default=_D.late_stages,
                   help=f"how many last stages get the extra depth (default {_D.late_stages})")
    p.add_argument("--max-size", type=int, default=480, help="largest eval image size (default 480, the paper's)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classes the parameter counts assume (default 1000, as the paper's tables)")


def run(args: argparse.Namespace) -> int:
    from effnetv2.model import get_config, save_config
    from effnetv2.model.search import measure, scale_family

    try:
        phis = tuple(float(x) for x in args.phis.split(",") if x.strip())
        source = Path(args.base) / "best.json" if Path(args.base).is_dir() else args.base
        base = get_config(source)
        coeffs = Compound(args.alpha, args.beta, args.gamma, args.late_depth, args.late_stages)
        members = scale_family(base, phis, num_classes=args.num_classes, coeffs=coeffs, max_size=args.max_size)
    except ValueError as e:  # bad phis, a bad config file (ConfigFileError), an unknown name, phi < 0
        print(f"effnetv2 scale: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rows = [(base.name, 0.0, base, *measure(base, args.num_classes), "")]
    for m in members:
        path = save_config(m.config, out / f"{m.config.name}.json", info=m.info(coeffs, base.name))
        rows.append((m.config.name, m.phi, m.config, m.params, m.flops, str(path)))
    print(f"effnetv2 scale: {base.name} grown by alpha {coeffs.alpha:g} (depth), beta {coeffs.beta:g} (width), "
          f"gamma {coeffs.gamma:g} (size) per unit of phi; last {coeffs.late_stages} stages x{coeffs.late_depth:g} "
          f"deeper; eval size capped at {args.max_size}; {args.num_classes} classes")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'member':<{width}}{'phi':>5}{'train':>7}{'eval':>6}{'layers':>8}{'head':>6}{'params':>10}{'FLOPs':>10}  file")
    for name, phi, cfg, params, flops, path in rows:
        layers = sum(s.repeats for s in cfg.scaled_stages())
        print(f"{name:<{width}}{phi:>5g}{cfg.train_size:>7}{cfg.eval_size:>6}{layers:>8}{cfg.head_channels:>6}"
              f"{params / 1e6:>9.2f}M{_flops(flops):>10}  {path}")
    return 0


def _flops(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    from effnetv2.recipes.cli.main import command

    return command("scale", argv)


if __name__ == "__main__":
    sys.exit(main())
