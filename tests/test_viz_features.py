
import numpy as np
import pytest

from m3ae.viz.curves import ema, read_metrics, run_labels
from m3ae.viz.tsne import embed_2d, knn_accuracy, load_features, pca_2d, separation


def test_load_features_formats_and_errors(tmp_path):
    f = np.ones((5, 3), np.float32)
    np.savez(tmp_path / "ok.npz", features=f, labels=np.array(["cat", "dog", "cat", "dog", "cat"]))
    fs = load_features(tmp_path / "ok.npz")
    assert fs.features.shape == (5, 3) and list(fs.labels[:2]) == ["cat", "dog"]
    np.savez(tmp_path / "bad.npz", features=f)
    with pytest.raises(ValueError, match="no 'labels'"):
        load_features(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", features=f, labels=np.array([1, "x", None, 2, 3], dtype=object))
    with pytest.raises(ValueError, match="without pickle"):
        load_features(tmp_path / "obj.npz")
    with pytest.raises(ValueError, match="safetensors or .npz"):
        (tmp_path / "x.pt").write_bytes(b"")
        load_features(tmp_path / "x.pt")


def test_embeddings_and_knn():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 15)
    x = rng.normal(size=(30, 6)) + labels[:, None] * 10
    xy, used = embed_2d(x, "pca")
    assert used == "pca" and xy.shape == (30, 2)
    xy, used = embed_2d(x, "auto")
    assert xy.shape == (30, 2)
    assert pca_2d(x[:, :1]).shape == (30, 2)
    assert knn_accuracy(x, labels) == 1.0


def test_panel_accuracy_leaves_out_unlabelled_points():
    # `m3ae embed` of a photo folder writes label -1 everywhere: the panel said "5-NN acc 100.0%"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    assert separation(x, np.full(12, -1)) == "unlabelled"
    assert separation(x, np.zeros(12, dtype=np.int64)) == "one class"
    labels = np.repeat([0, 1], 6)
    x[labels == 1] += 10
    assert separation(x, labels) == "5-NN acc 100.0%"
    # unlabelled points next to class 1 would count as neighbours and as misses
    mixed = np.concatenate([labels, np.full(6, -1)])
    x2 = np.concatenate([x, x[labels == 1] + 0.01])
    assert separation(x2, mixed) == "5-NN acc 100.0% of 12 labelled"


def test_curves_helpers(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 2, "loss": 1}\n{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n')
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["loss"] for r in rows] == [3, 2]  # step order, the re-logged step's last row wins
    # The evaluation monitor's row shares its step with the training row: both kept (was: the loss lost).
    (tmp_path / "e.jsonl").write_text('{"step": 5, "loss": 2.5}\n{"step": 5, "probe_top1": 40.0}\n')
    assert read_metrics(tmp_path / "e.jsonl") == [{"step": 5, "loss": 2.5, "probe_top1": 40.0}]
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert run_labels(["x/run/metrics.jsonl", "y/run/metrics.jsonl"]) == ["x/run", "y/run"]
    assert run_labels(["a/metrics.jsonl", "b/metrics.jsonl"]) == ["a", "b"]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no metrics"):
        read_metrics(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("features, message", [
    (np.full((5, 3), "a"), "'features' must be a real \\(N, D\\) array with D >= 1.*<U1"),  # was: numpy's error
    (np.zeros((5, 3), complex), "'features' must be a real.*complex"),  # was: imaginary parts dropped
    (np.zeros((5, 0), np.float32), "'features' must be a real \\(N, D\\) array with D >= 1"),  # was: IndexError
    (np.full((5, 3), np.nan, np.float32), "5 of 5 feature rows hold NaN or inf"),  # was: "SVD did not converge"
])
def test_hostile_feature_arrays_are_refused_naming_the_file(tmp_path, features, message):
    path = tmp_path / "f.npz"
    np.savez(path, features=features, labels=np.arange(5))
    with pytest.raises(ValueError, match=message) as err:
        load_features(path)
    assert str(path) in str(err.value)


def test_a_corrupt_feature_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "cut.npz").write_bytes(b"PK\3\4 cut short")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    for name in ("cut.npz", "cut.safetensors"):
        with pytest.raises(ValueError, match="not a readable") as err:  # was: BadZipFile, SafetensorError
            load_features(tmp_path / name)
        assert name in str(err.value)
