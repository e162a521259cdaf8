"""The default job with low-rank projection heads (``model.projection_kind=lowrank``) at each rank against
full linear heads: ``val/r1_mean``, per-attribute hard-group R@1, head parameters and time. Each run is
``python -m autoglm_train`` in its own process; the same seed, data and steps for all.

    python bench/lowrank_heads.py [--ranks 16 32 64] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402

# the default model's heads: resnet18_narrow (256 features) and the text tower (128 wide) to embed_dim 256
HEAD_SHAPES = ((256, 256), (128, 256))


def head_params(rank: int | None) -> int:
    if rank is None:
        return sum(i * o for i, o in HEAD_SHAPES)
    return sum(rank * (i + o) for i, o in HEAD_SHAPES)


def run_job(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "autoglm_train", *overrides, "progress_bar=false"]
    cmd.append(f"hydra.run.dir={run_dir}")
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowrank_heads_"))
    rows = []
    for rank in [None, *args.ranks]:
        overrides = [] if rank is None else ["model.projection_kind=lowrank", f"model.projection_rank={rank}"]
        metrics = run_job(overrides, work / f"rank-{rank or 'full'}")
        rows.append({"rank": rank, "head_params": head_params(rank), **metrics})
        print(f"rank {rank or 'full'}: val/r1_mean {metrics['val/r1_mean']:.4f}", flush=True)
    full = rows[0]["val/r1_mean"]
    result = {
        "bench": "lowrank_heads",
        "rows": [
            {
                "rank": r["rank"],
                "head_params": r["head_params"],
                "val/r1_mean": round(r["val/r1_mean"], 4),
                "delta_points": round(100 * (r["val/r1_mean"] - full), 2),
                **{k: round(v, 4) for k, v in r.items() if k.startswith("val/hard_r1_")},
                "time/run_s": round(r["time/run_s"], 1),
            }
            for r in rows
        ],
    }
    if not args.no_write:
        write_results(result)
    print(json.dumps(result))


def write_results(result: dict) -> None:
    lines = []
    for r in result["rows"]:
        hard = " / ".join(f"{r[k]:.3f}" for k in sorted(r) if k.startswith("val/hard_r1_"))
        name = "full (linear)" if r["rank"] is None else f"rank {r['rank']}"
        lines.append(
            f"| {name} | {r['head_params']:,} | {r['val/r1_mean']:.4f} | {r['delta_points']:+.2f} | {hard} "
            f"| {r['time/run_s']} |"
        )
    body = (
        "## Low-rank projection heads\n\n"
        "`python bench/lowrank_heads.py`: the default job (`make train`) with `model.projection_kind=lowrank "
        "model.projection_rank=R` against its linear heads; the same seed, data and steps.\n\n"
        "| heads | head parameters | val/r1_mean | Δ points | hard R@1 colour / position / shape / size "
        "| run s |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    RESULTS.write_text(replace_section(RESULTS.read_text(), "lowrank_heads", body))


if __name__ == "__main__":
    main()
