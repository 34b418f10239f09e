"""Every visualisation command writes a PNG on tiny inputs (CLI main() called in-process)."""
import json

import numpy as np
import pytest

from m3ae.cli import main

from viz_helpers import is_png, tiny_checkpoint, write_png


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    return root, tiny_checkpoint(root)


def test_reconstruct_demo_and_variants(run_dir, tmp_path):
    _, ckpt = run_dir
    out = tmp_path / "r.png"
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--data", "demo", "--out", str(out), "--n", "2"]) == 0
    assert is_png(out)
    out2 = tmp_path / "r2.png"
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--data", "demo", "--out", str(out2), "--n", "2",
                 "--caption", "a large green square", "--image-mask-ratio", "0.5"]) == 0
    assert is_png(out2)


def test_reconstruct_csv_folder_and_image_only(tmp_path):
    root = tmp_path / "run"
    ckpt = tiny_checkpoint(root)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    write_png(data / "images" / "x.png")
    write_png(data / "images" / "y.png", size=(30, 60), colour=(10, 120, 240))
    (data / "captions.csv").write_text("image,caption\nimages/x.png,a red square\nimages/x.png,again\n"
                                       "images/y.png,a blue circle\n")
    for spec in (data / "captions.csv", data / "images", data / "images" / "x.png"):
        out = tmp_path / f"{spec.name}.png"
        assert main(["reconstruct", "--checkpoint", str(ckpt), "--data", str(spec), "--out", str(out),
                     "--text-mask-ratio", "0.5"]) == 0
        assert is_png(out)
    mae = tiny_checkpoint(tmp_path / "mae", vocab_size=0)
    out = tmp_path / "mae.png"
    assert main(["reconstruct", "--checkpoint", str(mae), "--data", str(data / "captions.csv"), "--out", str(out)]) == 0
    assert is_png(out)
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_attention(run_dir, tmp_path, capsys):
    _, ckpt = run_dir
    image = write_png(tmp_path / "img.png", size=(64, 50))
    out = tmp_path / "a.png"
    assert main(["attention", "--checkpoint", str(ckpt), "--image", str(image), "--caption",
                 "a small red circle above a large blue square", "--token", "circle", "--out", str(out)]) == 0
    assert is_png(out)
    out2 = tmp_path / "a2.png"
    assert main(["attention", "--checkpoint", str(ckpt), "--image", "demo", "--out", str(out2), "--per-head",
                 "--layer", "mean", "--region", "1,2"]) == 0
    assert is_png(out2)
    assert main(["attention", "--checkpoint", str(ckpt), "--image", str(image), "--caption", "a red circle",
                 "--token", "banana", "--out", str(out)]) == 2
    assert "'banana' is not in the caption" in capsys.readouterr().err


def test_tsne_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 8)).astype(np.float32) + labels[:, None] * 3.0
    np.savez(tmp_path / "a.npz", features=features, labels=labels)
    save_file({"features": rng.normal(size=(60, 8)).astype(np.float32), "labels": labels.astype(np.int64)},
              str(tmp_path / "b.safetensors"))
    out = tmp_path / "t.png"
    assert main(["tsne", "--features", str(tmp_path / "a.npz"), "--features2", str(tmp_path / "b.safetensors"),
                 "--labels", "M3AE", "MAE", "--out", str(out)]) == 0
    assert is_png(out)
    out2 = tmp_path / "p.png"
    assert main(["tsne", "--features", str(tmp_path / "a.npz"), "--method", "pca", "--out", str(out2)]) == 0
    assert is_png(out2)


def test_plot(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": scale / s, "image_loss": scale / s, "text_loss": 2 * scale / s,
                 "lr": 1e-3 * min(1, s / 5)} for s in range(1, 30)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c.png"
    assert main(["plot", str(tmp_path / "a" / "metrics.jsonl"), str(tmp_path / "b"), "--out", str(out),
                 "--smooth", "0.6", "--accuracy"]) == 0
    assert is_png(out)


def test_images_follow_the_checkpoints_own_preprocessing(tmp_path):
    # A checkpoint trained on padded squares (fashion's `square: pad`) must be shown padded squares,
    # not centre crops; --stats replaces only the normalisation.
    from m3ae.data.normalization import denormalize
    from m3ae.preprocessing import Preprocessing
    from m3ae.viz import inputs

    from viz_helpers import tiny_model

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt, preprocessing=Preprocessing(image_size=32, square="pad"))
    tall = write_png(tmp_path / "tall.png", size=(20, 40), colour=(200, 30, 30))
    loaded = inputs.load_checkpoint(ckpt)
    for stats in (None, "imagenet"):
        preprocessing = inputs.preprocessing_for(loaded, stats)
        assert preprocessing.square == "pad" and preprocessing.stats == (
            loaded.preprocessing.stats if stats is None else Preprocessing.from_stats(32, stats).stats)
        pixels = denormalize(inputs.load_samples(str(tall), preprocessing)[0].image, preprocessing.stats)
        assert pixels.shape == (3, 32, 32)
        assert pixels[:, :, :5].min() > 0.95 and pixels[:, :, -5:].min() > 0.95  # white side bars
        assert pixels[0, :, 14:18].min() > 0.7 and pixels[1, :, 14:18].max() < 0.2  # red, top to bottom


def test_figures_are_written_whole_where_named(tmp_path):
    # matplotlib wrote OUT.png for an OUT without a suffix (the command reported OUT, a file that
    # does not exist), and wrote the image in place, so a kill left half a PNG.
    from matplotlib.figure import Figure

    from m3ae.viz import save_figure

    fig = Figure(figsize=(1, 1))
    assert is_png(save_figure(fig, tmp_path / "a.png"))
    assert save_figure(fig, tmp_path / "b.pdf").read_bytes()[:4] == b"%PDF"  # the format by the suffix
    with pytest.raises(ValueError, match="image suffix"):
        save_figure(fig, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.pdf"]  # no temp file, no c.png


def test_attention_region_takes_negative_coordinates():
    # "--region -1,0" was taken for an unknown option (only "--region=-1,0" parsed), and negative
    # coordinates were then refused; they count from the last row / column, as --layer does.
    from m3ae.cli import build_parser
    from m3ae.viz.attention import parse_region

    args = build_parser().parse_args(["attention", "--checkpoint", "c", "--image", "i", "--out", "a.png",
                                      "--region", "-1,0", "--layer", "-2"])
    assert args.region == "-1,0" and args.layer == -2
    assert parse_region(args.region, 4) == 12 and parse_region("-4,-1", 4) == 3 and parse_region("3,3", 4) == 15
    with pytest.raises(ValueError, match=r"-5,0 is outside the 4x4 patch grid \(0..3, or -4..-1 from the last\)"):
        parse_region("-5,0", 4)
