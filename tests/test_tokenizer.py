import json
import pickle
import time

import pytest
import torch
import torch.multiprocessing as mp

from autoglm_train.data.tokenizer import CaptionTokenizer, train_bpe

CAPTIONS = ["a large red circle at the top left", "a small blue square at the centre"] * 20


def test_bpe_pads_to_context_and_round_trips(tmp_path):
    tok = train_bpe(CAPTIONS, vocab_size=300, context_length=16)
    ids = tok(["a large red circle at the top left", "a"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert (ids[1, 3:] == 0).all() and (ids[0] != 0).sum() > 3
    assert tok.decode(ids[0]).strip() == "a large red circle at the top left"
    tok.save(tmp_path / "tokenizer.json")
    again = CaptionTokenizer.from_file(tmp_path / "tokenizer.json", context_length=16)
    assert torch.equal(again(CAPTIONS[:4]), tok(CAPTIONS[:4]))
    assert torch.equal(pickle.loads(pickle.dumps(tok))(CAPTIONS[:4]), tok(CAPTIONS[:4]))


def test_truncates_long_captions():
    tok = train_bpe(CAPTIONS, vocab_size=300, context_length=6)
    assert tok([" ".join(CAPTIONS[:5])]).shape == (1, 6)


# --- one tokenizer per run, made by rank 0 -----------------------------------------------------------------
def tokenizer_rank(rank: int, out: str, shards: list[str], launch: str) -> None:
    """One rank of a launch: counts its BPE trainings, writes the tokenizer it got."""
    import os
    from pathlib import Path

    from omegaconf import OmegaConf

    from autoglm_train import build

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "AUTOGLM_LAUNCH_ID": launch})
    trained_here = Path(out) / f"trained-by-rank{rank}"

    def counting_train_bpe(*args, **kwargs):
        trained_here.touch()
        time.sleep(1.0)  # long enough for rank 1 to find no tokenizer yet, and wait
        return train_bpe(*args, **kwargs)

    build.train_bpe = counting_train_bpe
    cfg = OmegaConf.create(
        {"path": None, "vocab_size": 400, "context_length": 16, "min_frequency": 1, "train_samples": 200}
    )
    model_cfg = OmegaConf.create(
        {"_target_": "autoglm_train.model.dual_encoder.DualEncoder", "text_tower": {}}
    )
    run_dir = Path(out) / "run"
    tokenizer = build.build_run_tokenizer(
        cfg, model_cfg, shards, "captions", None, run_dir / "tokenizer.json"
    )
    (Path(out) / f"rank{rank}.json").write_text(tokenizer.to_json())


def test_only_rank_zero_trains_the_tokenizer_and_every_rank_gets_it(tmp_path):
    from autoglm_train.data.shapes import write_shapes_shards

    shards = write_shapes_shards(tmp_path / "shapes", n_train=100, n_val=10, image_size=16)["train"]
    (tmp_path / "run").mkdir()
    # a tokenizer an earlier launch left in the same run directory (a requeued job): not this launch's
    stale = train_bpe(["stale words only"] * 5, vocab_size=50, context_length=16, min_frequency=1)
    stale.save(tmp_path / "run" / "tokenizer.json")
    (tmp_path / "run" / ".tokenizer.json.launch").write_text('{"launch": "earlier", "inputs": "x"}')

    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=tokenizer_rank, args=(r, str(tmp_path), shards, "launch-1")) for r in (1, 0)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert sorted(p.name for p in tmp_path.glob("trained-by-rank*")) == ["trained-by-rank0"]
    got = [(tmp_path / f"rank{r}.json").read_text() for r in (0, 1)]
    assert got[0] == got[1]
    assert json.loads(got[0]) == json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert got[0] != stale.to_json()
    assert CaptionTokenizer.from_file(tmp_path / "run" / "tokenizer.json", 16)("a red circle").shape == (
        1,
        16,
    )


def never_called(tmp):
    raise AssertionError("only rank 0 makes the file")


def test_a_rank_waiting_for_a_file_of_another_launch_times_out_clearly(tmp_path, monkeypatch):
    from autoglm_train.distributed.launch import made_once_per_launch

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / ".tokenizer.json.launch").write_text('{"launch": "earlier", "inputs": "key"}')
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("AUTOGLM_LAUNCH_ID", "this-launch")
    with pytest.raises(TimeoutError, match=r"RANK=1: waited 0.5s for rank 0 to write .*tokenizer.json"):
        made_once_per_launch(tmp_path / "tokenizer.json", never_called, "key", timeout_s=0.5)
    # rank 0's failure reaches the waiting ranks at once, with its reason
    (tmp_path / ".tokenizer.json.launch").write_text(
        '{"launch": "this-launch", "inputs": "key", "error": "OSError: disk full"}'
    )
    with pytest.raises(RuntimeError, match="rank 0 failed to make .*OSError: disk full"):
        made_once_per_launch(tmp_path / "tokenizer.json", never_called, "key", timeout_s=30)
