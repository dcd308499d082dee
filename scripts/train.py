#!/usr/bin/env python3
"""Train the bundled model from scratch (autoencoder, text encoder + UNet, decoder fine-tune), resumably.

    python scripts/train.py --run-dir runs/shapes --out sdlite/assets/sdlite-shapes.safetensors

Interrupt it at any time; running the same command again resumes from runs/.../state.pt.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sdlite.training.train import TrainConfig, Trainer, describe  # noqa: E402


def main() -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/shapes"), help="checkpoints and log (resumed)")
    p.add_argument("--out", type=Path, default=None, help="export the EMA model here (.safetensors) when done")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--steps", type=int, default=d.steps, help="diffusion steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--decoder-steps", type=int, default=d.decoder_steps,
                   help="phase 3: decoder-only fine-tune on whole images (0 skips it)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout)
    p.add_argument("--latent-pool", type=int, default=d.latent_pool)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(d, seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, steps=args.steps,
                  batch=args.batch, decoder_steps=args.decoder_steps, lr=args.lr, cfg_dropout=args.cfg_dropout, latent_pool=args.latent_pool)
    trainer = Trainer(cfg, args.run_dir, device=args.device)
    if trainer.try_resume():
        print(f"resumed {args.run_dir} at phase={trainer.phase} step={trainer.step}", file=sys.stderr)
    (args.run_dir / "config.json").write_text(json.dumps(describe(cfg), indent=1))
    t0 = time.perf_counter()
    trainer.run()
    print(f"trained in {time.perf_counter() - t0:.0f}s on {args.device} ({torch.get_num_threads()} threads); "
          f"scale_factor={trainer.scale_factor:.5f}", file=sys.stderr)
    if args.out is not None:
        print(f"wrote {trainer.export(args.out, overwrite=args.overwrite)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
