"""m3ae.cli._checks: a bad option value is refused by argparse (exit 2, one line naming the option)
before anything is loaded or run. Each case here used to be accepted and go wrong later: silently
(a 0 or negative --limit read everything or all but N, --k 0 / --temperature nan gave a meaningless
accuracy, an empty --caption / --token was ignored, --out FOLDER wrote FOLDER.png and reported
FOLDER) or with a traceback after the work (--max-points 0, --min-caption -3, bench data --samples 0)."""
from __future__ import annotations

import argparse

import pytest

from m3ae.cli import _checks as C
from m3ae.cli import main


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return {"DIR": str(tmp_path), "FILE": str(tmp_path / "file.txt")}


CASES = [
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "f.npz", "--limit", "0"], "--limit", "must be >= 1"),
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "f.npz", "--limit", "-5"], "--limit", "must be >= 1"),
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "f.npz", "--split", "test"], "--split", "invalid choice"),
    (["data", "shard", "d", "--out", "o-%03d.tar", "--limit", "0"], "--limit", "must be >= 1"),  # wrote nothing
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "DIR"], "--out", "is a folder"),
    (["knn", "--checkpoint", "c", "--train", "t", "--val", "v", "--k", "0"], "--k", "must be >= 1"),
    (["knn", "--checkpoint", "c", "--train", "t", "--val", "v", "--temperature", "nan"], "--temperature", "finite"),
    (["knn", "--checkpoint", "c", "--train", "t", "--val", "v", "--limit-val", "-1"], "--limit-val", ">= 1"),
    (["knn", "--checkpoint", "c", "--train", "t", "--val", "v", "--result", "DIR"], "--result", "is a folder"),
    (["probe", "--fast", "--checkpoint", "c", "--train", "t", "--val", "v", "--l2", "-1"], "--l2", ">= 0"),
    (["probe", "--checkpoint", "c", "--train", "t", "--val", "v", "--out", "FILE"], "--out", "is a file"),
    (["ood", "--checkpoint", "c", "--in-train", "t", "--in-test", "v", "--out", "o", "--limit-test", "0"],
     "--limit-test", ">= 1"),
    (["tsne", "--features", "f.npz", "--out", "t.png", "--perplexity", "nan"], "--perplexity", "finite"),
    (["tsne", "--features", "f.npz", "--out", "t.png", "--max-points", "0"], "--max-points", ">= 3"),
    (["plot", "m.jsonl", "--out", "DIR"], "--out", "is a folder"),
    (["plot", "m.jsonl", "--out", "curves"], "--out", "image suffix"),
    (["reconstruct", "--checkpoint", "c", "--out", "r.png", "--offset", "-1"], "--offset", ">= 0"),
    (["reconstruct", "--checkpoint", "c", "--out", "r.png", "--caption", ""], "--caption", "empty"),
    (["reconstruct", "--checkpoint", "c", "--out", "r.png", "--n", "100000"], "--n", "1..64"),
    (["attention", "--checkpoint", "c", "--image", "i", "--out", "a.png", "--token", ""], "--token", "empty"),
    (["attention", "--checkpoint", "c", "--image", "i", "--out", "a.png", "--layer", "x"], "--layer", "'mean'"),
    (["demo", "--out", "o", "--samples", "0"], "--samples", "1..64"),
    (["demo", "--out", "o", "--seed", "-1"], "--seed", "0..4294967295"),
    # A typo'd batch failed deep inside an allocation.
    (["pretrain", "--print-config", "--batch-size", str(10**9)], "--batch-size", "1..1048576, got 1000000000"),
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "f.npz", "--batch-size", str(10**9)], "--batch-size",
     "1..1048576"),
    (["probe", "--checkpoint", "c", "--train", "t", "--val", "v", "--probe-batch-size", "0"], "--probe-batch-size",
     "1..1048576"),
    (["finetune", "--checkpoint", "c", "--train", "t", "--val", "v", "--ft-batch-size", str(2**20 + 1)],
     "--ft-batch-size", "1..1048576"),
    (["pretrain", "--out", "FILE"], "--out", "is a file"),
    (["tokenizer", "train", "c.txt", "--out", "t.json", "--vocab-size", "0"], "--vocab-size", ">= 1"),
    (["bench", "train", "--min-caption", "-3"], "--min-caption", ">= 1"),
    (["bench", "train", "--peak-tflops", "nan"], "--peak-tflops", "finite"),
    (["bench", "data", "demo", "--samples", "0"], "--samples", ">= 1"),
    (["bench", "data", "demo", "--workers", "-1"], "--workers", ">= 0"),
    (["bench", "check", "--out", "o", "--budget", "-1"], "--budget", "> 0"),
    (["study", "s.yaml", "--out", "o", "--jobs", "0"], "--jobs", ">= 1"),
]


@pytest.mark.parametrize("argv,option,problem", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_option_values_are_usage_errors_naming_the_option(argv, option, problem, paths, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([paths.get(a, a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then the one error line
    assert f"argument {option}" in err and problem in err, err


def test_the_types_accept_their_ranges_and_say_what_is_wrong():
    assert C.integer(1, 3)("3") == 3 and C.number(0, 1, below=True)("0") == 0.0
    for parse, text, message in ((C.integer(1), "x", "expected an integer"), (C.number(0), "inf", "finite"),
                                 (C.number(0, above=True), "0", "> 0"), (C.figure_file, "", "must name a file")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
