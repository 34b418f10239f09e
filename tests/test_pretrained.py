"""Self-describing checkpoints and `m3ae.load`: each test names the failure of issue 13 it covers
(it failed before checkpoints carried their tokenizer and preprocessing)."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import m3ae
from data_files import WORDS, write_manifest, write_tokenizer
from m3ae import M3AE, M3AEConfig, Preprocessing
from m3ae.cli import main
from m3ae.data.images import EvalTransform
from m3ae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from m3ae.data.tokenizer import encode_batch, load_tokenizer
from m3ae.train.config import load_config
from m3ae.train.loop import pretrain

TINY = ["model.image_size=32", "model.patch_size=8", "model.emb_dim=32", "model.depth=1", "model.num_heads=2",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2", "data.num_workers=0",
        "batch_size=4", "log_every=1", "progress=false", "optim.warmup_steps=1", "steps=2"]


def _photo(path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _tiny(vocab_size=40, **kw) -> M3AE:
    torch.manual_seed(0)
    return M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=vocab_size,
                                       text_length=16, **kw)).eval()


def test_pretrain_checkpoints_carry_tokenizer_and_preprocessing(tmp_path):
    """Failure 1 (pretrain saved no tokenizer; reconstruct fell back to the demo vocabulary) and
    the three-line promise: the checkpoint folder alone gives features of a photo."""
    manifest = write_manifest(tmp_path / "data")
    tok_path = write_tokenizer(tmp_path)
    config = load_config("demo", TINY + [f"data.spec={manifest}", f"data.tokenizer={tok_path}",
                                         "model.vocab_size=256", "data.normalization=imagenet"])
    result = pretrain(config, tmp_path / "run")
    alone = tmp_path / "elsewhere" / "ckpt"  # no run folder around it
    shutil.copytree(result.checkpoint, alone)
    photo = _photo(tmp_path / "photo.png")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without any fallback
        model = m3ae.load(alone)
        feats = model.features(images=[photo])
    assert model.tokenizer.get_vocab() == load_tokenizer(tok_path).get_vocab()
    assert model.preprocessing.mean == IMAGENET_MEAN and model.preprocessing.std == IMAGENET_STD
    expected = EvalTransform(32, stats="imagenet")(str(photo))
    with torch.no_grad():
        torch.testing.assert_close(feats, model.model.encode(expected[None])[:, 0])

    # reconstruct reads the checkpoint's own tokenizer (words of the run's vocabulary, not the demo's)
    out = tmp_path / "recon.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["reconstruct", "--checkpoint", str(alone), "--data", manifest, "--n", "2",
                     "--out", str(out)]) == 0
    assert out.is_file()


def test_tokenizer_padding_and_truncation_are_neutralised(tmp_path):
    """Failure 2: a tokenizer.json saved with padding turned 61 of 64 ids into [PAD]."""
    tok = load_tokenizer(write_tokenizer(tmp_path))
    tok.enable_padding(length=64, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=64)
    tok.save(str(tmp_path / "padded.json"))
    with pytest.warns(UserWarning, match="padding and truncation settings are ignored"):
        loaded = load_tokenizer(tmp_path / "padded.json")
    ids = encode_batch(loaded, ["a dog runs", "the red ball"], max_length=64)
    assert [len(r) for r in ids] == [3, 3] and all(int(i) != 0 for r in ids for i in r)
    assert loaded.padding is None and loaded.truncation is None


def test_vocab_size_is_checked(tmp_path):
    with pytest.raises(ValueError, match="has .* tokens but the model's vocab_size is 10"):
        load_tokenizer(write_tokenizer(tmp_path), vocab_size=10)


def test_visualisation_reads_a_bert_vocab_txt(tmp_path):
    """Failure 3: `attention` / `reconstruct` crashed with a traceback on a BERT vocab.txt."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", *sorted(set(WORDS))]) + "\n")
    ckpt = _tiny().save_pretrained(tmp_path / "ckpt")
    image = _photo(tmp_path / "p.png")
    assert main(["attention", "--checkpoint", str(ckpt), "--tokenizer", str(vocab), "--image", str(image),
                 "--caption", "a red ball", "--token", "ball", "--out", str(tmp_path / "att.png")]) == 0
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--tokenizer", str(vocab), "--data", str(image),
                 "--caption", "a dog", "--out", str(tmp_path / "rec.png")]) == 0


def test_python_and_cli_features_agree(tmp_path):
    """Failure 4: the normalisation lived only in run_config.yaml and EvalTransform's default crop
    (0.875) differed from `m3ae embed`'s (1.0): one photo gave two feature vectors."""
    pre = Preprocessing.from_stats(32, "imagenet")
    ckpt = _tiny().save_pretrained(tmp_path / "ckpt", preprocessing=pre)
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    photo = _photo(tmp_path / "photos" / "cat" / "p.png", size=(60, 36))
    assert torch.equal(EvalTransform(32, stats="imagenet")(str(photo)), pre.transform()(str(photo)))  # one rule
    out = tmp_path / "f.safetensors"
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(tmp_path / "photos"), "--out", str(out),
                 "--num-workers", "0", "--quiet"]) == 0
    from m3ae.eval.features import load_features

    cli, _, _ = load_features(out)
    torch.testing.assert_close(cli, m3ae.load(ckpt).features(images=[photo]))


def test_features_batches_pil_tensors_and_captions(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="vocab_size is 40"):
        m3ae.Pretrained(_tiny(), Preprocessing(32), tok, "memory")
    model = _tiny(vocab_size=256)
    loaded = m3ae.Pretrained(model, Preprocessing(32), tok, "memory")
    photos = [Image.open(_photo(tmp_path / f"{i}.png", seed=i)) for i in range(5)]
    one_batch = loaded.features(images=photos, batch_size=8)
    assert one_batch.shape == (5, 64)
    torch.testing.assert_close(loaded.features(images=photos, batch_size=2), one_batch)
    tensors = loaded.images(photos)
    torch.testing.assert_close(loaded.features(images=tensors), one_batch)
    captions = ["a dog runs on the grass", "red ball", "the sky", "a man", "blue water"]
    joint = loaded.features(images=photos, captions=captions, batch_size=2, pool="mean")
    assert joint.shape == (5, 64)
    text = loaded.features(captions=captions[:2])
    ids, padding = loaded.texts(captions[:2])
    with torch.no_grad():
        torch.testing.assert_close(text, model.encode(None, ids, padding)[:, 0])
    with pytest.raises(ValueError, match="5 images but 2 captions"):
        loaded.features(images=photos, captions=captions[:2])
    # Every token, captions of different lengths over several batches: one padding for all of them.
    every = loaded.features(captions=captions, all_tokens=True, batch_size=2)
    ids, padding = loaded.texts(captions)
    with torch.no_grad():
        torch.testing.assert_close(every, model.encode(None, ids, padding))
    # Float64 / float16 tensors are cast to the model's dtype; uint8 arrays are pixels, as PIL's.
    torch.testing.assert_close(loaded.features(images=tensors.double()), one_batch)
    torch.testing.assert_close(loaded.features(images=[np.asarray(p) for p in photos]), one_batch)
    with pytest.raises(ValueError, match=r"image 0: an array must be \(H, W\) or \(H, W, C\) uint8"):
        loaded.features(images=[np.zeros((4, 4, 3))])


@pytest.mark.parametrize("call, message", [
    (lambda m: m.features(images="photo.jpg"), "images must be a list, got a str; wrap one item as images="),
    (lambda m: m.features(captions="a red circle"), "captions must be a list, got a str"),
    (lambda m: m.features(images=np.zeros((2, 32, 32, 3))), "images must be a list, got a ndarray"),
    (lambda m: m.features(images=[]), "no images or captions given"),
    (lambda m: m.features(images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
     "must be floating point, got torch.uint8"),
    (lambda m: m.features(images=torch.zeros(2, 3, 32, 32), batch_size=0), "batch_size must be >= 1"),
    (lambda m: m.features(captions=[None]), "caption 0 is a NoneType, not a str"),
    (lambda m: m.features(captions=["a dog", 3]), "caption 1 is a int, not a str"),
])
def test_features_refuse_odd_inputs_clearly(tmp_path, call, message):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    loaded = m3ae.Pretrained(_tiny(vocab_size=256), Preprocessing(32), tokenizer, "memory")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        call(loaded)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_load_on_cuda_without_cuda_is_a_clear_error(tmp_path):
    _tiny().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        m3ae.load(tmp_path / "m", device="cuda")


def test_older_checkpoints_load_with_a_warning(tmp_path):
    """Checkpoints written before this change (no tokenizer.json / preprocessor_config.json): the
    run's settings are used, and the user is told."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    _tiny().save_pretrained(ckpt)
    (ckpt / "preprocessor_config.json").unlink()
    (ckpt / "run_config.yaml").write_text("data:\n  spec: demo\n  normalization: imagenet\n")
    with pytest.warns(UserWarning, match="older checkpoint") as caught:
        loaded = m3ae.load(ckpt)
    assert len(caught) == 2
    assert loaded.preprocessing.mean == IMAGENET_MEAN
    from m3ae.data.synthetic import build_demo_tokenizer

    assert loaded.tokenizer.get_vocab() == build_demo_tokenizer().get_vocab()
    # a run that does not say which tokenizer: loads, warns, and captions then ask for one
    (ckpt / "run_config.yaml").unlink()
    with pytest.warns(UserWarning, match="captions need an explicit tokenizer"):
        bare = m3ae.load(ckpt)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        bare.features(captions=["a dog"])


def test_a_broken_preprocessor_config_names_the_file(tmp_path):
    ckpt = _tiny().save_pretrained(tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").write_text('{"image_size": 32, "mean": [0.5, 0.5], "std": [1, 1, 1]}')
    with pytest.raises(ValueError, match="preprocessor_config.json: preprocessing needs 3 means"):
        m3ae.load(ckpt)
    (ckpt / "preprocessor_config.json").write_text('{"image_size": 32, "resize_to": 40}')
    with pytest.raises(ValueError, match=r"unknown preprocessing keys \['resize_to'\]"):
        m3ae.load(ckpt)


def test_from_pretrained_is_in_eval_mode_and_save_refuses_a_too_large_tokenizer(tmp_path):
    # Dropout and drop-path off after loading, as in transformers: encode() is deterministic.
    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=40, drop_path=0.3, drop=0.1))
    model.save_pretrained(tmp_path / "m")
    loaded = M3AE.from_pretrained(tmp_path / "m")
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), loaded.encode(x), rtol=0, atol=0)
    from m3ae.data.synthetic import build_demo_tokenizer

    small = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=5))
    with pytest.raises(ValueError, match="tokens but the model's vocab_size is 5"):
        small.save_pretrained(tmp_path / "s", tokenizer=build_demo_tokenizer())
    assert not (tmp_path / "s").exists()


def test_a_save_without_a_tokenizer_removes_an_earlier_saves_tokenizer(tmp_path):
    """Was: re-saving into a folder kept the tokenizer.json of the model saved there before, so the
    folder paired the new weights with another model's vocabulary. Other files there stay."""
    from m3ae.data.synthetic import build_demo_tokenizer
    from m3ae.eval.finetune import Classifier

    folder = tmp_path / "m"
    _tiny().save_pretrained(folder, tokenizer=build_demo_tokenizer())
    assert (folder / "tokenizer.json").is_file()
    (folder / "notes.txt").write_text("mine")
    (folder / "vocab.txt").write_text("[PAD]\n")  # not a file this format writes: the user's
    _tiny().save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                        "preprocessor_config.json", "vocab.txt"]
    with pytest.warns(UserWarning, match="has no tokenizer.json"):
        assert m3ae.load(folder).tokenizer is None  # not the earlier model's
    # A link of that name goes (the link, not what it points at); a folder of that name is not ours.
    target = tmp_path / "elsewhere.json"
    build_demo_tokenizer().save(str(target))
    (folder / "tokenizer.json").symlink_to(target)
    _tiny().save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists() and target.is_file()
    # A fine-tuned classifier saved over a checkpoint folder: no tokenizer of the checkpoint left.
    _tiny().save_pretrained(tmp_path / "c", tokenizer=build_demo_tokenizer())
    Classifier(_tiny(), 3).save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c" / "tokenizer.json").exists()
    # With a tokenizer, the new one replaces the old.
    _tiny().save_pretrained(folder, tokenizer=build_demo_tokenizer())
    assert m3ae.load(folder).tokenizer.get_vocab() == build_demo_tokenizer().get_vocab()
