"""Two gloo ranks through Lightning and CompressedDDPStrategy: the same training as one process holding
the global batch, and each compression hook really attached and within its expected error."""

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, free_port
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from autoglm_train.distributed.compression import CompressedDDPStrategy
from autoglm_train.lit.callbacks import CommStats
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.itm import ITMLoss
from autoglm_train.losses.objective import Objective
from autoglm_train.losses.triplet import TripletLoss
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

pytestmark = pytest.mark.slow
B, STEPS, WORLD = 8, 3, 2  # per-rank batch; the single process takes 2B


def global_batches(steps: int = STEPS, negatives: bool = False):
    g = torch.Generator().manual_seed(7)
    batches = [
        {
            "image": torch.randn(WORLD * B, 3, 32, 32, generator=g),
            "text": torch.randint(1, 50, (WORLD * B, 8), generator=g),
            # pairs of rows share an id (two captions of one image): masking must hold across ranks
            "id": torch.arange(WORLD * B) // 2 + 100 * s,
        }
        for s in range(steps)
    ]
    if negatives:  # a caption negative per row, every third slot without one
        for batch in batches:
            batch["text_neg"] = torch.randint(1, 50, (WORLD * B, 8), generator=g)
            batch["text_neg_valid"] = torch.arange(WORLD * B) % 3 != 0
    return batches


def make_module(loss: str) -> DualEncoderModule:
    torch.manual_seed(0)  # no batch norm: per-rank statistics would differ from the global batch's
    image_tower = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    fusion = {"layers": 1, "heads": 2} if "fusion" in loss else None
    lora = {"enabled": True, "rank": 2, "alpha": 4, "targets": {}} if "lora" in loss else None
    model = DualEncoder(image_tower, TextTower(50, 32, 1, 2, 8), embed_dim=16, fusion=fusion, lora=lora)
    term = TripletLoss(margin=0.2, mining="semihard") if loss == "triplet" else InfoNCE()
    # SGD, not Adam: Adam turns float noise in near-zero gradients (e.g. attention key biases) into
    # full-size updates, which would hide a real difference behind an arbitrary tolerance
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1)
    terms = {loss.split("+")[0]: term} | ({"itm": ITMLoss(seed=3)} if fusion else {})
    return DualEncoderModule(model, Objective(terms), optimizer=optimizer)


class Record(L.Callback):
    def __init__(self):
        self.losses, self.grads, self.logged, self.drawn = [], [], {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if "itm" in pl_module.objective.terms:  # the ITM negatives this rank drew (global rows)
            self.drawn.append(tuple(t.clone() for t in pl_module.objective.terms["itm"].drawn))

    def on_train_end(self, trainer, pl_module):
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_after_backward(self, trainer, pl_module):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def fit(module, batches, strategy="auto", devices=1, steps=STEPS, ckpt_path=None, save=None) -> Record:
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[record, CommStats()],  # as train.py adds it
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=[], ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)  # on every rank, as ModelCheckpoint does
    return record


def worker(rank: int, port: int, out_dir: str, loss: str, compression: str, options: dict) -> None:
    # as under srun: the processes exist already, Lightning only joins them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    module = make_module(loss)
    batches = global_batches(negatives="negatives" in loss)
    shard = [{k: v[rank * B : (rank + 1) * B] for k, v in b.items()} for b in batches]
    strategy = CompressedDDPStrategy(compression=compression, process_group_backend="gloo", **options)
    checkpoint = Path(out_dir) / f"{compression}.ckpt" if compression == "powersgd" else None
    record = fit(module, shard, strategy=strategy, devices=WORLD, save=checkpoint)
    resumed = {}
    if checkpoint:  # one more step from the checkpoint: PowerSGD's saved state goes into the new hook
        again = CompressedDDPStrategy(compression=compression, process_group_backend="gloo", **options)
        fit(make_module(loss), shard, strategy=again, devices=WORLD, steps=STEPS + 1, ckpt_path=checkpoint)
        hook = again.powersgd
        resumed = {"iter": hook.state.iter, "pool": len(hook.pool), "factors": len(hook.state.q_memory_dict)}
    torch.save(
        {
            "resumed": resumed,
            "losses": record.losses,
            "grads": record.grads,
            "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "hook": strategy.comm_hook_name,
            "comm": strategy.comm_stats,
            "logged": record.logged,
            "drawn": record.drawn,
        },
        Path(out_dir) / f"{compression}-{loss}-rank{rank}.pt",
    )


def run_two_ranks(tmp_path, loss="infonce", compression="none", **options):
    mp.spawn(worker, args=(free_port(), str(tmp_path), loss, compression, options), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{compression}-{loss}-rank{r}.pt") for r in range(WORLD)]


# infonce+negatives+fusion: caption negatives (loss.text_negatives) gathered from both ranks like the
# captions, and the fusion stage's ITM term drawing its negatives from the global batch
@pytest.mark.parametrize("loss", ["infonce", "triplet", "infonce+negatives+fusion"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, loss):
    ranks = run_two_ranks(tmp_path, loss)
    module = make_module(loss)
    single = fit(module, global_batches(negatives="negatives" in loss))
    for step, drawn in enumerate(single.drawn):  # the same ITM negatives as one process draws
        for part in range(2):
            torch.testing.assert_close(torch.cat([r["drawn"][step][part] for r in ranks]), drawn[part])
    assert len(single.drawn) == (STEPS if "fusion" in loss else 0)
    # each rank's loss is its share of the global mean; DDP averages, so the mean over ranks is the loss
    for step in range(STEPS):
        mean = sum(r["losses"][step] for r in ranks) / WORLD
        assert mean == pytest.approx(single.losses[step], abs=1e-5), step
    for name, p in module.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], p.detach(), atol=1e-5, rtol=0, msg=name)
        assert torch.equal(ranks[1]["params"][name], ranks[0]["params"][name]), name  # replicas in lockstep
    assert ranks[0]["hook"] == "allreduce_hook"


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("none"))[0]


@pytest.mark.parametrize(
    ("mode", "hook", "rel_err"),
    [("fp16", "fp16_compress_hook", 2e-3), ("bf16", "bf16_compress_hook", 1.6e-2)],
)
def test_half_precision_hooks_are_attached_and_within_rounding(tmp_path, uncompressed, mode, hook, rel_err):
    got = run_two_ranks(tmp_path, compression=mode)[0]
    assert got["hook"] == hook
    assert got["comm"]["bytes"] == pytest.approx(uncompressed["comm"]["bytes"] / 2)
    assert got["logged"]["comm/ratio"] == pytest.approx(got["comm"]["bytes"] / got["comm"]["uncompressed"])
    assert len(got["losses"]) == STEPS and all(map(torch.isfinite, map(torch.tensor, got["losses"])))
    for name, g in uncompressed["grads"][0].items():
        err = (got["grads"][0][name] - g).abs().max()
        assert err <= rel_err * g.abs().max() + 1e-7, (name, float(err))


def test_powersgd_is_attached_and_sends_a_low_rank_projection(tmp_path, uncompressed):
    # two plain steps (same parameters as the uncompressed run), then at the third, without error
    # feedback, each compressed matrix is P P^T M exactly, M the uncompressed average; what PowerSGD
    # leaves uncompressed is all-reduced as is
    options = dict(powersgd_rank=1, powersgd_start_iter=2, error_feedback=False)
    got = run_two_ranks(tmp_path, compression="powersgd", **options)[0]
    for name, g in uncompressed["grads"][1].items():
        assert torch.equal(got["grads"][1][name], g), name
    assert got["hook"] == "powerSGD_hook"
    assert got["comm"]["bytes"] < 0.5 * uncompressed["comm"]["bytes"]
    # the Lightning checkpoint carries PowerSGD's state by parameter name, and a resumed run takes it up
    saved = torch.load(tmp_path / "powersgd.ckpt", weights_only=True)["powersgd"]
    # without error feedback: the warm-start factors of the compressed matrices
    assert saved["iter"] == STEPS and saved["params"] and set(saved["params"]) <= set(uncompressed["params"])
    assert all(set(parts) == {"q"} for parts in saved["params"].values())
    assert got["resumed"] == {"iter": STEPS + 1, "pool": 0, "factors": 1}
    compressed = 0
    for name, m in uncompressed["grads"][2].items():
        c = got["grads"][2][name]
        matrix = m.reshape(m.shape[0], -1) if m.ndim > 1 else None
        if matrix is None or not _should_compress(*matrix.shape, 1, 2)[0]:
            torch.testing.assert_close(c, m, atol=1e-6, rtol=1e-5, msg=name)
            continue
        compressed += 1
        c = c.reshape(matrix.shape)
        assert torch.linalg.matrix_rank(c, rtol=1e-4) <= 1, name
        # an orthogonal projection: no longer than M, and the residual is orthogonal to it
        assert c.norm() <= matrix.norm() * (1 + 1e-4), name
        residual = matrix - c
        assert (residual * c).sum().abs() <= 1e-3 * matrix.norm() ** 2 + 1e-9, name
    assert compressed > 0


def test_lora_adapters_train_under_powersgd_and_resume(tmp_path):
    # adapters in both towers, their gradients through PowerSGD; the run is saved and resumed a step
    options = dict(powersgd_rank=1, powersgd_start_iter=2, error_feedback=True)
    ranks = run_two_ranks(tmp_path, loss="infonce+lora", compression="powersgd", **options)
    initial = make_module("infonce+lora").state_dict()
    assert ranks[0]["hook"] == "powerSGD_hook" and ranks[0]["resumed"]["iter"] == STEPS + 1
    assert all(math.isfinite(x) for x in ranks[0]["losses"])
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, atol=0, rtol=0)  # the ranks agree
        head = name.startswith(("model.image_proj.", "model.text_proj."))
        trained = head or ".lora_" in name or "log_logit_scale" in name
        if ".lora_B." in name or head:
            assert not torch.equal(value, initial[name]), name
        elif not trained:
            assert torch.equal(value, initial[name]), name  # the frozen base, bit for bit
    assert any(".lora_B." in n for n in ranks[0]["params"])


def gather_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from autoglm_train.distributed.gather import gather_variable, sum_counts

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    # rank 1 evaluated no shard: it holds an empty tensor of unknown width and dtype
    embeddings = torch.arange(6.0).reshape(3, 2) if rank == 0 else torch.empty(0)
    ids = torch.tensor([5, 6, 7]) if rank == 0 else torch.empty(0)
    # each rank skipped its own bad samples, of partly different kinds
    skipped = {"bad_image": 1, "tar_error": 2} if rank == 0 else {"bad_image": 3, "bad_caption": 1}
    gathered = [gather_variable(embeddings), gather_variable(ids), sum_counts(skipped)]
    torch.save(gathered, Path(out_dir) / f"gather{rank}.pt")
    dist.destroy_process_group()


def test_gathering_evaluation_outputs_when_a_rank_has_no_shard_and_summing_skip_counts(tmp_path):
    mp.spawn(gather_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        embeddings, ids, skipped = torch.load(tmp_path / f"gather{rank}.pt")
        assert torch.equal(embeddings, torch.arange(6.0).reshape(3, 2))
        assert torch.equal(ids, torch.tensor([5, 6, 7]))
        assert skipped == {"bad_image": 4, "tar_error": 2, "bad_caption": 1}


def test_command_line_ddp_cpu_run_with_compression(shapes_dir, tmp_path):
    # two gloo processes started by Lightning's launcher; the tiny set has one held-out shard, so the
    # second rank evaluates nothing and the first all 200 images
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "autoglm_train", *TINY, "trainer=ddp_cpu", "compression=fp16"]
    args += ["trainer.max_steps=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        args, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=400
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "cluster environment: LightningEnvironment (rank 0 of 2)" in out
    assert "DDP comm hook fp16_compress_hook attached" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/images"] == 200 and metrics["val/captions"] == 400
    assert metrics["train/steps"] == 4 and metrics["train/samples"] == 4 * 64 * 2
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    ratios = {row.split(",")[header.index("comm/ratio")] for row in logged[1:]} - {""}
    assert ratios and all(float(r) == pytest.approx(0.5) for r in ratios)
