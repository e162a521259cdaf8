"""PowerSGD through NamedPowerSGD on gloo ranks: what is excluded travels uncompressed and exact, the bytes
sent are the plan's, and its state (residuals, warm-start factors, step count) survives a checkpoint: a run
stopped and resumed, on the same or another number of ranks, ends where the uninterrupted run ends."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_train.distributed import compression as comp
from autoglm_train.distributed.compression import comm_hook, describe_plan, powersgd_plan

pytestmark = pytest.mark.slow
B, WORLD, STEPS = 8, 2, 6  # per-rank batch


class Net(nn.Module):
    """Parameters registered a, b, c but used a, c, b: the order gradients become ready differs from
    DDP's initial bucket order, so DDP rebuilds its bucket after the first step of every process."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)
        self.c = nn.Linear(32, 32)
        self.embedding = nn.Embedding(40, 16)

    def forward(self, x, tokens):
        h = torch.relu(self.a(x + self.embedding(tokens).mean(1)))
        return self.b(torch.relu(self.c(h)))


def batches(steps: int):
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(WORLD * B, 16, generator=g),
            torch.randint(0, 40, (WORLD * B, 5), generator=g),
            torch.randn(WORLD * B, 4, generator=g),
        )
        for _ in range(steps)
    ]


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def hooked(model: nn.Module, **options):
    ddp = DDP(model, bucket_cap_mb=1024)  # one bucket, as CompressedDDPStrategy has on gloo
    state, hook = comm_hook("powersgd", named_parameters=model.named_parameters(), **options)
    ddp.register_comm_hook(state, hook)
    return ddp, getattr(hook, "powersgd", hook)


def train(ddp, data, rank: int, world: int, record=None):
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    per = len(data[0][0]) // world
    for x, t, y in data:
        rows = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x[rows], t[rows]), y[rows])
        comp._count.active, comp._count.bytes = True, 0
        loss.backward()
        comp._count.active = False
        if record is not None:
            record.append(({n: p.grad.clone() for n, p in ddp.module.named_parameters()}, comp._count.bytes))
        opt.step()


OPTIONS = dict(powersgd_rank=1, powersgd_start_iter=2, error_feedback=True)


def resume_job(rank: int, world: int, out: Path, job: str) -> None:
    torch.manual_seed(0)
    model, data = Net(), batches(STEPS)
    if job == "straight":
        ddp, _ = hooked(model, **OPTIONS)
        train(ddp, data, rank, world)
    elif job == "first_half":
        ddp, hook = hooked(model, **OPTIONS)
        train(ddp, data[: STEPS // 2], rank, world)
        saved = hook.state_dict()  # collective: every rank calls it
        if rank == 0:
            torch.save({"model": model.state_dict(), "powersgd": saved}, out / "half.pt")
        dist.barrier()
    else:  # second half, from the checkpoint, with the PowerSGD state restored or not
        checkpoint = torch.load(out / "half.pt", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        ddp, hook = hooked(model, **OPTIONS)
        if job == "resumed":
            hook.load_state_dict(checkpoint["powersgd"])
        else:  # only the step count: compression goes on, residuals and factors start afresh
            hook.state.iter = checkpoint["powersgd"]["iter"]
        train(ddp, data[STEPS // 2 :], rank, world)
        assert job != "resumed" or (hook.relayouts >= 1 and not hook.pool)  # the rebuilt bucket was re-laid
    if rank == 0:
        torch.save(model.state_dict(), out / f"{job}-{world}.pt")


def exclusion_job(rank: int, out: Path) -> None:
    torch.manual_seed(0)
    model, data = Net(), batches(3)
    reference = Net()
    reference.load_state_dict(model.state_dict())
    options = dict(powersgd_rank=1, powersgd_start_iter=2, error_feedback=False)
    ddp, _ = hooked(model, powersgd_exclude=["c.*", "embedding.*"], **options)
    record = []
    comp._count_all_reduce_bytes()
    train(ddp, data, rank, WORLD, record)
    # the average gradient at the third (first compressed) step, from one process holding the global batch
    opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    for i, (x, t, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.mse_loss(reference(x, t), y).backward()
        if i < 2:
            opt.step()
    exact = {n: p.grad.clone() for n, p in reference.named_parameters()}
    if rank == 0:
        torch.save({"record": record, "exact": exact}, out / "exclusion.pt")


def worker(rank: int, world: int, port: int, out: str, jobs: list[str]) -> None:
    init(rank, world, port)
    for job in jobs:  # each a new DDP model in the same process group
        if job == "exclusion":
            exclusion_job(rank, Path(out))
        else:
            resume_job(rank, world, Path(out), job)
    # no destroy_process_group: with DDP models still alive it aborts the process at exit


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("powersgd")
    jobs = ["straight", "first_half", "resumed", "fresh_state", "exclusion"]
    mp.spawn(worker, args=(WORLD, free_port(), str(out), jobs), nprocs=WORLD, join=True)
    mp.spawn(worker, args=(1, free_port(), str(out), ["resumed"]), nprocs=1, join=True)
    return out


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_a_resumed_run_on_two_or_one_ranks_ends_where_the_uninterrupted_run_ends(runs):
    def load(name):
        return torch.load(runs / name, weights_only=True)

    saved = load("half.pt")["powersgd"]
    assert saved["iter"] == STEPS // 2
    for name, p in Net().named_parameters():  # one mean residual per parameter, shaped like it
        assert saved["params"][name]["error"].shape == p.shape, name
    compressed = {"a.weight", "b.weight", "c.weight", "embedding.weight"}
    assert {n for n, parts in saved["params"].items() if "q" in parts} == compressed

    straight = load(f"straight-{WORLD}.pt")
    assert max_difference(load(f"resumed-{WORLD}.pt"), straight) < 1e-5
    # on one rank holding the global batch: the mean residual is all PowerSGD needs
    assert max_difference(load("resumed-1.pt"), straight) < 1e-5
    # the check can fail: without the residuals and factors the run ends elsewhere
    assert max_difference(load(f"fresh_state-{WORLD}.pt"), straight) > 1e-3


def test_excluded_parameters_travel_uncompressed_and_the_bytes_are_the_plans(runs):
    got = torch.load(runs / "exclusion.pt", weights_only=True)
    (grads, sent), exact = got["record"][2], got["exact"]
    plan = {t.name: t for t in powersgd_plan(Net().named_parameters(), 1, 2, ["c.*", "embedding.*"])}
    assert plan["c.weight"].why == plan["embedding.weight"].why == "excluded"
    assert plan["a.weight"].why == plan["b.weight"].why == "compressed"
    for name, t in plan.items():
        if t.why == "compressed":  # rank 1: not the average
            assert (grads[name] - exact[name]).abs().max() > 1e-4, name
        else:  # vectors and excluded matrices: the exact average
            torch.testing.assert_close(grads[name], exact[name], atol=1e-6, rtol=1e-5, msg=name)
    # bytes by group: uncompressed tensors in full, compressed ones as their n x r and m x r factors
    full = sum(t.numel for t in plan.values() if t.matrix is None)
    factors = sum(t.elements_sent for t in plan.values() if t.matrix is not None)
    assert factors == (16 + 32) + (4 + 32)
    assert sent == 4 * (full + factors)
    assert got["record"][0][1] == 4 * sum(t.numel for t in plan.values())  # the uncompressed start


def test_the_plan_says_what_is_compressed_and_why():
    plan = powersgd_plan(Net().named_parameters(), rank=4, min_rate=2, exclude=["embedding.*"])
    why = {t.name: t.why for t in plan}
    # b: 4 x 32 at rank 4 is (4 + 32) * 4 = 144 elements against 128: not worth it
    assert why == {
        "a.weight": "compressed",
        "a.bias": "vector",
        "b.weight": "small",
        "b.bias": "vector",
        "c.weight": "compressed",
        "c.bias": "vector",
        "embedding.weight": "excluded",
    }
    text = describe_plan(plan)
    assert "excluded: 1 tensors, 640 parameters (embedding.weight)" in text
    sent = 4 * ((32 + 16) * 4 + (32 + 32) * 4 + 32 + 4 + 32 + 4 * 32 + 640)
    assert f"{sent / 2**20:.2f} MiB" in text
