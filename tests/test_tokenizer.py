import pickle

import torch

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
