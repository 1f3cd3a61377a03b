import random

import pytest
import torch

from spikellm.data import (DataError, calib_windows, eval_windows, joined_text, load_rows,
                           read_c4_documents, tokenize)


def test_wikitext_rows_match_the_hf_dataset(data_root):
    test = load_rows("wikitext2", "test", data_root)
    valid = load_rows("wikitext2", "validation", data_root)
    assert len(test) == 4358 and len(valid) == 3760                 # HF row counts
    assert test[0] == "" and test[1] == " = Robert Boulter = \n"
    assert sum(1 for r in test if r) == 2891
    text = joined_text("wikitext2", "test", data_root)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")


def test_ptb_and_c4_rows(data_root):
    ptb = load_rows("ptb", "test", data_root)
    assert len(ptb) == 3761 and ptb[0] == "no it was n't black monday"
    docs = read_c4_documents(data_root / "c4" / "c4_valid_part_of_0.json")
    assert len(docs) == 1025
    assert docs[0].startswith("The woman who died after falling from a bridge over the A21")


def test_eval_windows_are_non_overlapping_and_drop_the_remainder(smollm, data_root):
    ids = tokenize(smollm.tokenizer, joined_text("wikitext2", "test", data_root))
    win = eval_windows(ids, 512)
    assert win.shape == (ids.shape[1] // 512, 512)
    assert torch.equal(win.flatten(), ids[0, : win.numel()])
    assert torch.equal(eval_windows(ids, 512, max_windows=3), win[:3])


def test_calibration_windows_follow_the_seeded_gptq_protocol(smollm, data_root):
    ids = tokenize(smollm.tokenizer, joined_text("wikitext2", "validation", data_root))
    win = calib_windows(ids, 8, 256, seed=2)
    rng = random.Random(2)
    for k in range(8):
        i = rng.randint(0, ids.shape[1] - 256 - 1)
        assert torch.equal(win[k], ids[0, i: i + 256])
    assert torch.equal(win, calib_windows(ids, 8, 256, seed=2))
    assert not torch.equal(win, calib_windows(ids, 8, 256, seed=3))


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_rows("wikitext2", "test", tmp_path)
    msg = str(e.value)
    assert "wikitext-2-raw-v1/wiki.test.raw" in msg and str(tmp_path) in msg and "\n" not in msg
