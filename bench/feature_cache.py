"""Training samples/s with a locked image tower, its features cached against recomputed, side by side.

The default job on the embedded set with ``model.lock_image=true`` (a random tower saved as a weights file,
as a user's released weights would be), for each tower: ResNet-18 at the default 64 px and a ViT-tiny at
64 px. Rounds alternate (without, with, without, with); the first round with the cache builds it, so every
timed step is an epoch-2+ step (the build runs before training's clock starts, and its time is reported
beside). Each run is ``python -m autoglm_train`` in its own process; figures are its ``time/samples_per_s``.

    python bench/feature_cache.py [--steps 120] [--rounds 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402

# (steps per run are --steps, times `steps` here)
TOWERS = {
    "resnet18 (64 px)": {"name": "resnet18", "timm": {}, "overrides": [], "steps": 1.0},
    "vit_tiny (64 px)": {
        "name": "vit_tiny_patch16_224",
        "timm": {"img_size": 64},
        "overrides": ["+model.image_tower.img_size=64", "model.image_tower.channels_last=false"],
        "steps": 1.0,
    },
    # the size released towers take; a 6,000-image set keeps building the cache to minutes on 2 cores
    "resnet18 (224 px)": {
        "name": "resnet18",
        "timm": {},
        "overrides": [
            "data.image_size=224",
            "data.prepare.n_train=6000",
            "data.prepare.samples_per_shard=1000",
        ],
        "steps": 0.3,
    },
}


def save_random_tower(name: str, timm_kwargs: dict, path: Path) -> None:
    torch.manual_seed(0)
    save_file(timm.create_model(name, num_classes=0, **timm_kwargs).state_dict(), str(path))


def run_job(overrides: list[str], run_dir: Path, data_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "autoglm_train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(data_dir)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), help="keys of TOWERS")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="feature_cache_bench_"))
    data_dir = ROOT / "data"  # the embedded set made once, shared with make train
    results = {}
    for tower in args.towers:
        spec = TOWERS[tower]
        weights = work / f"{spec['name']}.safetensors"
        save_random_tower(spec["name"], spec["timm"], weights)
        steps = max(10, int(args.steps * spec["steps"]))
        base = [
            f"model.image_tower.name={spec['name']}",
            f"model.image_tower.checkpoint={weights}",
            "model.lock_image=true",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "eval.zeroshot.task=null",
            "logger=none",
            "progress_bar=false",
            f"paths.feature_cache_dir={work / 'cache'}",
            *spec["overrides"],
        ]
        rates = {"recomputed": [], "cached": []}
        outside = {}
        for r in range(args.rounds):
            for mode in ("recomputed", "cached"):
                cache = f"model.cache_locked_features={'true' if mode == 'cached' else 'false'}"
                run_dir = work / f"{tower.split()[0]}-{len(results)}-{mode}-{r}"
                metrics = run_job([*base, cache], run_dir, data_dir)
                rates[mode].append(metrics["time/samples_per_s"])
                if r == 0:  # the cache is built in the first cached run, before training's clock
                    outside[mode] = metrics["time/run_s"] - metrics["time/train_s"]
                print(f"{tower} round {r + 1} {mode:>10}: {rates[mode][-1]:8.1f} samples/s", flush=True)
        median = {k: statistics.median(v) for k, v in rates.items()}
        results[tower] = {
            "steps": steps,
            "recomputed": round(median["recomputed"], 1),
            "cached": round(median["cached"], 1),
            "ratio": round(median["cached"] / median["recomputed"], 2),
            "cache_build_s": round(outside["cached"] - outside["recomputed"], 1),
            "rounds": rates,
        }
    result = {"bench": "feature_cache", "steps": args.steps, "threads": torch.get_num_threads(), **results}
    if not args.no_write:
        write_results(args, result)
    print(json.dumps(result))


def write_results(args, result: dict) -> None:
    rows = "\n".join(
        f"| {tower} | {r['steps']} | {r['recomputed']} | {r['cached']} | **{r['ratio']}x** "
        f"| {r['cache_build_s']} s |"
        for tower, r in result.items()
        if isinstance(r, dict)
    )
    body = (
        "## Locked image tower: cached features\n\n"
        f"`python bench/feature_cache.py --steps {args.steps} --rounds {args.rounds}`: the default job with "
        "`model.lock_image=true` (a random tower saved as a weights file), training samples/s at epoch 2+ "
        "with `model.cache_locked_features=true` against the tower recomputed each step; median of "
        f"alternating rounds, {result['threads']} threads, each run its own process.\n\n"
        "| locked tower | steps | recomputed | cached | ratio | cache built in |\n|---|---|---|---|---|---|\n"
        f"{rows}\n"
    )
    RESULTS.write_text(replace_section(RESULTS.read_text(), "feature_cache", body))


if __name__ == "__main__":
    main()
