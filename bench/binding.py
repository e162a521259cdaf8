"""The default job against binding: the dual encoder alone, with caption hard negatives
(``loss.text_negatives``), with the fusion stage re-ranking (``model.fusion.layers``, ``eval.rerank.k``),
and with both; the same seed, data and steps. ``two_stage`` trains a fusion stage on the locked towers
of the ``negatives`` run (``init_from``; its heads go on training) for ``--stage2-steps`` more steps,
re-ranking with ``itm+itc``. Each run is ``python -m autoglm_train`` in its own process. Prints one
JSON line per run and a table for docs/results.md.

    python bench/binding.py [--only dual,negatives,fusion,both,two_stage] [--extra OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from lowrank_heads import run_job  # noqa: E402

SETTINGS = {
    "dual": [],
    "negatives": ["loss.text_negatives=swap"],
    "fusion": ["model.fusion.layers=2", "eval.rerank.k=16"],
    "both": ["loss.text_negatives=swap", "model.fusion.layers=2", "eval.rerank.k=16"],
}
# stage 2 on top of `negatives`: the towers stay as stage 1 left them, a fusion stage learns to re-rank
SECOND_STAGE = [
    "model.lock_image=true",
    "model.lock_image_freeze_bn=true",
    "model.lock_text=true",
    "model.fusion.layers=2",
    "loss.text_negatives=swap",
    "eval.rerank.k=16",
    "eval.rerank.score=itm+itc",
]
KINDS = ("shape", "colour", "position", "size", "binding")


def row(name: str, m: dict) -> str:
    def hard(prefix: str) -> str:
        return " / ".join(
            f"{m[f'val/{prefix}hard_r1_{k}']:.3f}" for k in KINDS if f"val/{prefix}hard_r1_{k}" in m
        )

    ms = (
        1000 * m["train/samples"] / m["train/steps"] / m["time/samples_per_s"]
    )  # training only, no evaluation
    line = f"| {name} | {m['val/r1_mean']:.4f} | {hard('')} | {ms:.0f} |"
    if "val/rerank_r1_mean" in m:
        rerank = m["val/rerank_r1_mean"]
        line += f"\n| {name}, re-ranked (k=16) | {rerank:.4f} | {hard('rerank_')} | |"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SETTINGS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--stage2-steps", type=int, default=1320, help="steps of two_stage's second stage")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="binding_"))
    names = args.only.split(",")
    if "two_stage" in names and "negatives" not in names:  # its first stage
        names.insert(names.index("two_stage"), "negatives")
    lines = []
    for name in names:
        if name == "two_stage":
            stage1 = work / "negatives" / "checkpoints" / "last.ckpt"
            extra = [o for o in args.extra if not o.startswith("trainer.max_steps=")]
            steps = f"trainer.max_steps={args.stage2_steps}"
            overrides = [*SECOND_STAGE, f"init_from={stage1}", steps, *extra]
        else:
            overrides = [*SETTINGS[name], *args.extra]
        metrics = run_job(overrides, work / name)
        print(
            json.dumps({"bench": "binding", "setting": name, "overrides": overrides, **metrics}), flush=True
        )
        lines.append(row(name, metrics))
    print("| setting | val/r1_mean | hard R@1 shape / colour / position / size / binding | ms a step |")
    print("|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
