"""The default job against binding: the dual encoder alone, with caption hard negatives
(``loss.text_negatives``), with the fusion stage re-ranking (``model.fusion.layers``, ``eval.rerank.k``),
and with both; the same seed, data and steps. Each run is ``python -m autoglm_train`` in its own process.
Prints one JSON line per run and a table for docs/results.md.

    python bench/binding.py [--only dual,negatives,fusion,both] [--extra OVERRIDE ...]
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="binding_"))
    lines = []
    for name in args.only.split(","):
        metrics = run_job([*SETTINGS[name], *args.extra], work / name)
        overrides = SETTINGS[name] + args.extra
        print(
            json.dumps({"bench": "binding", "setting": name, "overrides": overrides, **metrics}), flush=True
        )
        lines.append(row(name, metrics))
    print("| setting | val/r1_mean | hard R@1 shape / colour / position / size / binding | ms a step |")
    print("|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
