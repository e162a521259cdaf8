"""Bytes per step and retrieval of `shapes_align` trained by 2 gloo ranks under each gradient compression
setting: the PowerSGD sweep behind the `compression=powersgd` defaults.

Each setting is one command-line run (`trainer=ddp_cpu` plus the setting's overrides, Lightning starting
both ranks) with the same seed, global batch and step budget. Bytes are what the DDP communication hook
all-reduced (counted by CompressedDDPStrategy), per rank: per step in the steady state (median) and over
the whole run (mean, which includes PowerSGD's uncompressed first `start_iter` steps). Results accumulate
in bench/compression_runs.json (a setting already there with the same steps and batch is not rerun unless
--rerun); the table and the plot (docs/compression_frontier.png: Δ R@1 against bytes ratio) are rebuilt
from it into docs/results.md. Last line: one JSON object; ``ratio`` = mean bytes of the chosen default
(`compression=powersgd`) / bytes uncompressed.

    python bench/compression.py [--steps 160] [--batch-size 64] [--settings none,powersgd,r1,...]
                                [--rerun] [--no-write]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402

STORE = ROOT / "bench" / "compression_runs.json"
PLOT = ROOT / "docs" / "compression_frontier.png"
PSGD = "compression=powersgd"


def psgd(rank: int, exclude: str = "[]", min_compression_rate: float = 2, **changes: str) -> list[str]:
    """A PowerSGD setting: the rank, exclusions and size threshold pinned (so that a later change of
    conf/compression/powersgd.yaml cannot move it), then what else it changes from the defaults."""
    pinned = [f"compression.rank={rank}", f"compression.exclude={exclude}"]
    pinned.append(f"compression.min_compression_rate={min_compression_rate}")
    return [PSGD, *pinned, *(f"compression.{key}={value}" for key, value in changes.items())]


# the pins every setting shares, left out of the table
PINNED = (PSGD, "compression.exclude=[]", "compression.min_compression_rate=2")
EMBED_HEADS = "[*embedding*,*image_proj*,*text_proj*]"
# name -> overrides on top of the base run
SETTINGS: dict[str, list[str]] = {
    "none": ["compression=none"],
    "fp16": ["compression=fp16"],
    "bf16": ["compression=bf16"],
    "powersgd": [PSGD],  # whatever the defaults are now
    "powersgd_aggressive": ["compression=powersgd_aggressive"],
    **{f"r{rank}": psgd(rank) for rank in (1, 2, 4, 8, 16, 32)},
    **{f"r{rank}_fp16": psgd(rank, fp16="true") for rank in (4, 8, 16, 32)},
    "r4_no_error_feedback": psgd(4, error_feedback="false"),
    "r4_no_warm_start": psgd(4, warm_start="false"),
    "r4_start50": psgd(4, start_iter="50"),
    "r4_min_rate16": psgd(4, min_compression_rate=16),
    "r4_excl_embed_heads": psgd(4, exclude=EMBED_HEADS),
    "r16_excl_embed_heads": psgd(16, exclude=EMBED_HEADS),
    "r4_excl_text": psgd(4, exclude="[*text_tower*,*embedding*,*_proj.*]"),
}


def base_command(steps: int, batch_size: int, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "autoglm_train",
        "trainer=ddp_cpu",
        f"data.batch_size={batch_size}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "threads=1",  # one core per rank
        "callbacks=none",
        "logger=csv",
        "progress_bar=false",
        "eval.zeroshot.task=null",
        f"hydra.run.dir={run_dir}",
    ]


def run_setting(overrides: list[str], steps: int, batch_size: int, run_dir: Path) -> dict:
    command = base_command(steps, batch_size, run_dir) + overrides
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        diverged = [line for line in done.stderr.splitlines() if "NonFiniteError: training diverged" in line]
        if not diverged:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        # a setting that diverges is a result of the sweep, not a failure of it
        return {"overrides": overrides, "steps": steps, "batch_size": batch_size, "diverged": diverged[0]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/bytes")]
    sent = [float(r["comm/bytes"]) for r in rows]
    return {
        "overrides": overrides,
        "steps": steps,
        "batch_size": batch_size,
        "bytes_per_step": statistics.median(sent),  # steady state: PowerSGD starts late
        "bytes_mean": statistics.fmean(sent),  # the whole run, warm-up included
        "bytes_uncompressed": statistics.fmean(float(r["comm/bytes_uncompressed"]) for r in rows),
        "steps_logged": len(rows),
        "val_r1_mean": metrics["val/r1_mean"],
        "samples_per_s": metrics["time/samples_per_s"],
    }


def load_store() -> dict:
    return json.loads(STORE.read_text()) if STORE.is_file() else {}


def frontier_plot(budgets: dict[str, dict], path: Path) -> None:
    """Δ val/r1_mean against the bytes ratio, one point per setting, one marker per step budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for (key, runs), marker in zip(budgets.items(), "os^D", strict=False):
        base = runs["none"]
        for name, r in runs.items():
            if name == "none" or "diverged" in r:
                continue
            x = r["bytes_per_step"] / base["bytes_per_step"]  # a long run's cost; the table has the mean too
            y = 100 * (r["val_r1_mean"] - base["val_r1_mean"])
            color = "tab:red" if name.startswith("powersgd") else "tab:blue"
            ax.scatter(x, y, marker=marker, color=color, zorder=3, label=f"{key.split('x')[0]} steps")
            below = name.startswith("powersgd")  # presets: label below, clear of the sweep's point
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10 if below else 3), fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.axhline(-1, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(0.1, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes all-reduced per step once PowerSGD runs / compression=none")
    ax.set_ylabel("Δ val/r1_mean vs compression=none (points)")
    ax.set_title(
        "2 gloo ranks, shapes_align (dashed: -1 point; dotted: 10x fewer bytes; red: presets)", fontsize=8
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[tuple[str, dict]], base: dict, steps: int, batch_size: int) -> str:
    lines = [
        f"`python bench/compression.py --steps {steps} --batch-size {batch_size}`: "
        f"`experiment=shapes_align trainer=ddp_cpu`, 2 gloo ranks x {batch_size} (global batch "
        f"{2 * batch_size}), one thread each, {steps} steps, seed 0, one validation at the end. Bytes are "
        "what the DDP hook all-reduced, per rank: per step in the steady state (median) and the mean over "
        "the run, which counts PowerSGD's uncompressed first `start_iter` steps; the ratio is taken on the "
        "mean. samples/s is indicative only: 2 ranks share 2 cores with whatever else runs. Settings: "
        "bench/compression.py `SETTINGS`; runs: bench/compression_runs.json. "
        "Plot: [compression_frontier.png](compression_frontier.png).",
        "",
        "| setting | overrides | MiB / step | vs none | mean MiB / step | vs none | val/r1_mean | Δ points "
        "| samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        if "diverged" in r:
            continue
        overrides = " ".join(o.removeprefix("compression.") for o in r["overrides"] if o not in PINNED)
        overrides = overrides or "the preset's defaults"
        lines.append(
            f"| {name} | `{overrides}` | {r['bytes_per_step'] / 2**20:.2f} | "
            f"{r['bytes_per_step'] / base['bytes_per_step']:.4f} | {r['bytes_mean'] / 2**20:.2f} | "
            f"{r['bytes_mean'] / base['bytes_mean']:.4f} | {r['val_r1_mean']:.4f} | "
            f"{100 * (r['val_r1_mean'] - base['val_r1_mean']):+.1f} | {r['samples_per_s']:.1f} |"
        )
    for name, r in rows:
        if "diverged" in r:
            overrides = " ".join(o.removeprefix("compression.") for o in r["overrides"] if o not in PINNED)
            lines.append(f"| {name} | `{overrides}` | | | | | diverged | | |")
    notes = [f"- {name}: {r['diverged'].split(': ', 1)[1]}" for name, r in rows if "diverged" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (global batch = 2x)")
    parser.add_argument("--settings", default="none,fp16,powersgd,powersgd_aggressive")
    parser.add_argument("--rerun", action="store_true", help="run settings already in the store again")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    names = args.settings.split(",")
    if names[0] != "none":
        names.insert(0, "none")  # the baseline every ratio is taken against
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")

    key = f"{args.steps}x{args.batch_size}"
    store = load_store()
    runs = store.setdefault(key, {})
    for name in names:
        if name in runs and not args.rerun and runs[name]["overrides"] == SETTINGS[name]:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = run_setting(SETTINGS[name], args.steps, args.batch_size, Path(tmp) / name)
        runs[name] = r
        STORE.write_text(json.dumps(store, indent=1) + "\n")  # after each run: a long sweep loses nothing
        if "diverged" in r:
            print(f"{name:>20}: {r['diverged']}", file=sys.stderr, flush=True)
            continue
        print(
            f"{name:>20}: {r['bytes_per_step'] / 2**20:7.2f} MiB/step (mean {r['bytes_mean'] / 2**20:.2f}) "
            f"of {r['bytes_uncompressed'] / 2**20:.2f}, val/r1_mean {r['val_r1_mean']:.4f}",
            file=sys.stderr,
            flush=True,
        )

    base = runs["none"]
    rows = sorted(runs.items(), key=lambda kv: -kv[1].get("bytes_mean", 0))
    print(table(rows, base, args.steps, args.batch_size))
    if not args.no_write:
        budgets = dict(sorted(store.items(), key=lambda kv: int(kv[0].split("x")[0])))
        tables = [
            table(
                sorted(r.items(), key=lambda kv: -kv[1].get("bytes_mean", 0)),
                r["none"],
                *map(int, k.split("x")),
            )
            for k, r in budgets.items()
            if "none" in r
        ]
        frontier_plot(budgets, PLOT)
        RESULTS.write_text(
            replace_section(
                RESULTS.read_text(),
                "compression",
                "## Gradient compression (2 gloo ranks)\n\n" + "\n\n".join(tables),
            )
        )
    summary = {
        name: {
            "bytes_ratio": round(r["bytes_mean"] / base["bytes_mean"], 4),
            "steady_ratio": round(r["bytes_per_step"] / base["bytes_per_step"], 4),
            "val_r1_mean": round(r["val_r1_mean"], 4),
            "r1_vs_none": round(r["val_r1_mean"] - base["val_r1_mean"], 4),
        }
        for name, r in rows
        if "diverged" not in r
    }
    headline = summary.get("powersgd", {}).get("bytes_ratio")
    print(json.dumps({"bench": "compression", "steps": args.steps, "settings": summary, "ratio": headline}))


if __name__ == "__main__":
    main()
