"""Regenerate the pictures in docs/images/ from the fashion study (real data, issue 11):

    m3ae study studies/fashion.yaml --out runs/study-fashion --data-root DATA --report-only --pictures m3ae
    PYTHONPATH=src python docs/make_viz_images.py runs/study-fashion [OUT_DIR [REPORT_DIR]]

Copies the study's pictures of its M3AE (seed 0) and draws the loss curves of M3AE and MAE with
`m3ae plot`. The study report's own plots go to REPORT_DIR: docs/results/fashion/ by default, and
OUT_DIR/report when only OUT_DIR is given. Nothing is copied unless every input is there.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from m3ae.cli import main

PICTURES = {  # study output -> docs/images name
    "reconstruct_m3ae.png": "reconstruct.png",
    "reconstruct_conditioned_m3ae.png": "reconstruct_conditioned.png",
    "attention_m3ae_watch.png": "attention.png",
    "attention_m3ae_shoes.png": "attention_shoes.png",
    "attention_m3ae_red.png": "attention_red.png",
    "tsne_type.png": "tsne.png",
}
REPORT = ["results.md", "results.json", "evals_cls.png", "evals_mean.png", "masked_words.png", "loss_curves.png"]


def run(study_out: Path, out: Path, report_out: Path) -> None:
    missing = [name for name in (*PICTURES, *REPORT) if not (study_out / name).is_file()]
    missing += [f"runs/{arm}/seed0/metrics.jsonl" for arm in ("m3ae", "mae")
                if not (study_out / "runs" / arm / "seed0" / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"{study_out} is not a finished fashion study with pictures (m3ae study "
                         f"studies/fashion.yaml ... --pictures m3ae); missing: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    report_out.mkdir(parents=True, exist_ok=True)
    for src, dst in PICTURES.items():
        shutil.copyfile(study_out / src, out / dst)
    for name in REPORT:
        shutil.copyfile(study_out / name, report_out / name)
    runs = [str(study_out / "runs" / arm / "seed0" / "metrics.jsonl") for arm in ("m3ae", "mae")]
    if main(["plot", *runs, "--labels", "M3AE", "MAE", "--smooth", "0.6", "--accuracy",
             "--out", str(out / "curves.png")]) != 0:
        raise SystemExit("m3ae plot failed")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    images = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/images")
    report = Path(sys.argv[3]) if len(sys.argv) > 3 else images / "report" if len(sys.argv) > 2 else Path(
        "docs/results/fashion")
    run(Path(sys.argv[1]), images, report)
