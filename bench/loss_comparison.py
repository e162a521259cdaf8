"""val/r1_mean on shapes_align at an equal step budget for each loss: infonce (the baseline), triplet with
each mining mode, infonce_triplet and siglip. Runs them one after another in this process, same seed, data
and model, and rewrites the loss-comparison section of docs/results.md.
Last line: one JSON object with every figure and ``ratio`` = best other loss / infonce.

    python bench/loss_comparison.py [--steps 200] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from autoglm_train import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
VARIANTS = {
    "infonce": ["loss=infonce"],
    "triplet (all)": ["loss=triplet", "loss.mining=all"],
    "triplet (semihard)": ["loss=triplet", "loss.mining=semihard"],
    "triplet (hard)": ["loss=triplet", "loss.mining=hard"],
    "infonce_triplet (hard)": ["loss=infonce_triplet", "loss.mining=hard"],
    "siglip": ["loss=siglip"],
}


def run_variant(overrides: list[str], output_dir: Path) -> dict[str, float]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return train.run(cfg)


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    common = [
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "logger=none",
        "callbacks=none",
        "progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            metrics = run_variant(common + overrides, Path(tmp) / str(i))
            results[name] = metrics
            print(f"{name:>24}: val/r1_mean {metrics['val/r1_mean']:.4f}", file=sys.stderr, flush=True)

    base = results["infonce"]["val/r1_mean"]
    lines = [
        f"`python bench/loss_comparison.py --steps {args.steps}`: `experiment=shapes_align`",
        "(ResNet-18 + 2-layer text transformer, batch 128, AdamW 1e-3, cosine schedule),",
        f"{args.steps} steps each, seed 0, margin 0.2, learned temperature",
        "(init 0.07; SigLIP 0.1 with bias -10). 1,000 held-out images, 2,000 captions.",
        "",
        "| loss | val/r1_mean | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 | vs infonce |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['val/r1_mean']:.4f} | {m['val/i2t_r1']:.4f} | {m['val/t2i_r1']:.4f} | "
            f"{m['val/i2t_r5']:.4f} | {m['val/t2i_r5']:.4f} | {m['val/r1_mean'] / base:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        text = (
            RESULTS.read_text()
            if RESULTS.exists()
            else "# Results\n\nMeasured on this project's 2-core CPU machine unless noted.\n"
        )
        RESULTS.write_text(
            replace_section(text, "loss_comparison", "## Losses at an equal step budget\n\n" + table)
        )
    best_other = max(v["val/r1_mean"] for k, v in results.items() if k != "infonce")
    print(
        json.dumps(
            {
                "bench": "loss_comparison",
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                **{f"{k}/val_r1_mean": round(v["val/r1_mean"], 4) for k, v in results.items()},
                "ratio": round(best_other / base, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
