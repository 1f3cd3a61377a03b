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


@pytest.mark.parametrize("seqlen,nsamples", [(512, 128), (2048, 32)])
def test_dev_windows_never_overlap_calibration_windows(smollm, data_root, seqlen, nsamples):
    """On the real WikiText-2 validation file: every calibration window of several seeds lies
    before the held-out tail, and no dev window shares a token position with one."""
    from spikellm.data import CalibSpec, calibration_set, dev_cut, evaluation_set
    tok = smollm.tokenizer
    ids = tokenize(tok, joined_text("wikitext2", "validation", data_root))
    cut = dev_cut(ids.shape[1], 0.1)
    dev = evaluation_set(tok, "wikitext2", seqlen, split="dev", data_dir=data_root)
    assert torch.equal(dev.flatten(), ids[0, cut: cut + dev.numel()])       # dev = the tail
    for seed in (0, 1, 2, 3):
        spec = CalibSpec("wikitext2", "validation", nsamples, seqlen, seed)
        cal = calibration_set(tok, spec, data_root)
        rng = random.Random(seed)
        for k in range(nsamples):       # reconstruct each window's start: all end before the tail
            i = rng.randint(0, cut - seqlen - 1)
            assert torch.equal(cal[k], ids[0, i: i + seqlen]) and i + seqlen <= cut
    # and no dev window equals any calibration window's content
    cal = calibration_set(tok, CalibSpec("wikitext2", "validation", nsamples, seqlen, 2), data_root)
    assert not any(torch.equal(c, d) for c in cal for d in dev)


def test_c4_dev_documents_are_never_calibration_documents(smollm, data_root):
    from spikellm.data import CalibSpec, calibration_set, dev_cut, evaluation_set
    tok = smollm.tokenizer
    docs = load_rows("c4", "train", data_root)
    cut = dev_cut(len(docs), 0.1)
    cal = calibration_set(tok, CalibSpec("c4", "train", 16, 256, 0), data_root)
    dev = evaluation_set(tok, "c4", 256, 8, split="dev", data_dir=data_root,
                         calib=CalibSpec("c4", "train", 16, 256, 0))
    tail = [tok(d, return_tensors="pt").input_ids[0] for d in docs[cut:]]
    head_text = "\n".join(docs[:cut])
    for w in dev:                       # each dev window comes from a held-out document
        assert any(_contains(t, w) for t in tail)
    for w in cal:
        assert tok.decode(w[8:-8]) in head_text


def _contains(seq: torch.Tensor, win: torch.Tensor) -> bool:
    n = win.numel()
    return any(torch.equal(seq[i: i + n], win) for i in range(seq.numel() - n + 1))


def test_a_text_file_dataset_gives_the_loaders_windows(smollm, data_root, tmp_path):
    from spikellm.data import evaluation_set
    tok = smollm.tokenizer
    path = tmp_path / "wiki_test_copy.txt"
    path.write_text(joined_text("wikitext2", "test", data_root), encoding="utf-8")
    ours = evaluation_set(tok, str(path), 512, 20)
    ref = evaluation_set(tok, "wikitext2", 512, 20, data_dir=data_root)
    assert torch.equal(ours, ref)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError) as e:
        evaluation_set(tok, str(bad), 512)
    assert str(bad) in str(e.value) and "UTF-8" in str(e.value)
    with pytest.raises(DataError):
        evaluation_set(tok, str(path), 512, split="dev")
