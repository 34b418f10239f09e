"""Hugging Face Hub: hub ids resolved through huggingface_hub's own snapshot_download against a
cache the test builds in the library's real layout (models--OWNER--NAME/{blobs,refs,snapshots}),
offline; the model card; uploads against tests/hub_mirror.py, a local stand-in for the Hub."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import m3ae
from m3ae import M3AE, M3AEConfig, Preprocessing
from m3ae.hub import model_card, resolve_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tiny(seed=0) -> M3AE:
    torch.manual_seed(seed)
    return M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=40, text_length=16)).eval()


def _cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> None:
    """Lay `folder` out as huggingface_hub caches a download: content-addressed blobs, a snapshot
    of relative symlinks per commit, refs naming the commit."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(
            b"blob %d\0" % len(data) + data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(root / "blobs" / blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


def test_hub_id_loads_from_the_cache_offline(tmp_path):
    """Failure 5: M3AE.from_pretrained("user/repo") said "checkpoint folder not found"."""
    from data_files import write_tokenizer
    from m3ae.data.tokenizer import load_tokenizer

    second = _tiny(1)
    tok = load_tokenizer(write_tokenizer(tmp_path))
    cache = tmp_path / "cache"
    v1, v2 = "a" * 40, "b" * 40
    big = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=256, text_length=16))
    big.save_pretrained(tmp_path / "v1", tokenizer=tok, preprocessing=Preprocessing.from_stats(32, "imagenet"))
    second.save_pretrained(tmp_path / "v2")
    _cache_repo(cache, "someone/tiny-m3ae", tmp_path / "v1", v1, refs=())
    _cache_repo(cache, "someone/tiny-m3ae", tmp_path / "v2", v2, refs=("main",))

    latest = M3AE.from_pretrained("someone/tiny-m3ae", cache_dir=cache, local_files_only=True)
    for k, v in second.state_dict().items():
        torch.testing.assert_close(latest.state_dict()[k], v)
    pinned = m3ae.load("someone/tiny-m3ae", revision=v1, cache_dir=cache, local_files_only=True)
    assert pinned.model.config.vocab_size == 256 and pinned.tokenizer.get_vocab() == tok.get_vocab()
    assert pinned.preprocessing.std == (0.229, 0.224, 0.225)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        M3AE.from_pretrained("someone/other", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        M3AE.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_offline_env_and_local_folder_first(tmp_path):
    """HF_HUB_OFFLINE=1 + HF_HUB_CACHE: the command line reads the cache and never the network;
    a local folder with the hub id's name wins over the hub."""
    cache = tmp_path / "cache"
    _tiny(0).save_pretrained(tmp_path / "v")
    _cache_repo(cache, "someone/tiny-m3ae", tmp_path / "v", "c" * 40)
    (tmp_path / "someone").mkdir()
    _tiny(5).save_pretrained(tmp_path / "someone" / "tiny-m3ae")  # same name, local
    code = ("import m3ae, torch, sys; m = m3ae.load('someone/tiny-m3ae').model; "
            "print(float(m.cls_token.sum()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": SRC,
           "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # any request would fail
    from_cache = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path.parent,
                                capture_output=True, text=True, timeout=120)
    assert from_cache.returncode == 0, from_cache.stderr
    local = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert float(from_cache.stdout) == pytest.approx(float(_tiny(0).cls_token.sum()))
    assert float(local.stdout) == pytest.approx(float(_tiny(5).cls_token.sum()))


def test_model_card_describes_the_checkpoint(tmp_path):
    folder = _tiny().save_pretrained(tmp_path / "ckpt", preprocessing=Preprocessing.from_stats(32, "imagenet"))
    (folder / "run_config.yaml").write_text("steps: 1000\nbatch_size: 128\ndata:\n  spec: shards/{0..9}.tar\n"
                                            "optim:\n  lr: 0.0015\n")
    card = model_card(folder, "someone/tiny-m3ae", results={"CIFAR-10 linear probe top-1": "46.5 %"})
    assert card.startswith("---\nlibrary_name: m3ae")
    for text in ("64 wide x 2 blocks", "patch 8 px", "data.spec: shards/{0..9}.tar", "steps: 1000",
                 "optim.lr: 0.0015", "std [0.229, 0.224, 0.225]", "| CIFAR-10 linear probe top-1 | 46.5 % |",
                 "m3ae.load('someone/tiny-m3ae')"):
        assert text in card, text


def test_resolve_keeps_local_folders_and_rejects_bad_ids(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        resolve_checkpoint("./missing/folder")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        resolve_checkpoint("bad id with spaces/x y")


def test_resolve_names_a_file_given_for_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file: pass the checkpoint folder that holds it"):
        resolve_checkpoint(tmp_path / "model.safetensors")


def test_push_to_an_unreachable_hub_is_one_clear_line(tmp_path):
    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=0))
    model.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_local",
           "HF_HOME": str(tmp_path / "home")}
    push = subprocess.run([sys.executable, "-m", "m3ae", "push", str(tmp_path / "ckpt"), "someone/x"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert push.returncode == 1
    assert "pushing to someone/x failed" in push.stderr and "Traceback" not in push.stderr, push.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                      "preprocessor_config.json"]


def _run(code: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def test_push_and_download_through_a_local_hub_mirror(tmp_path):
    """The real huggingface_hub code paths against tests/hub_mirror.py (a local server speaking the
    endpoints one repo needs): `m3ae push` (create repo, card validation, preupload, commit), then
    m3ae.load downloads into an empty cache, then loads again offline with the server gone. The
    mirror takes every file as a regular upload: the Hub's LFS / Xet upload path is not exercised."""
    from hub_mirror import HubMirror

    from data_files import write_tokenizer
    from m3ae.data.tokenizer import load_tokenizer

    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=256, text_length=16))
    tok = load_tokenizer(write_tokenizer(tmp_path))
    source = m3ae.Pretrained(model.eval(), Preprocessing.from_stats(32, "imagenet"), tok, "memory")
    source.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "train_state.pt").write_bytes(b"training state: stays local")
    # Online against the mirror, whatever the caller's HF_HUB_OFFLINE (the offline step sets it itself).
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    features = ("import m3ae, torch; m = m3ae.load('someone/tiny-m3ae'); "
                "print(m.features(images=torch.ones(1, 3, 32, 32), captions=['a dog']).sum().item(), "
                "m.preprocessing.std)")
    with HubMirror("someone/tiny-m3ae") as hub:
        env["HF_ENDPOINT"] = hub.url
        result = tmp_path / "probe.json"
        result.write_text(json.dumps({"command": "probe", "data": {"val": "cifar:val"},
                                      "metrics": {"top1": 46.5, "note": "text"}}))
        push = subprocess.run([sys.executable, "-m", "m3ae", "push", str(tmp_path / "ckpt"), "someone/tiny-m3ae",
                               "--results", str(result)], env={**env, "HF_TOKEN": "hf_local"}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)
        assert push.returncode == 0, push.stderr
        assert push.stdout.strip().endswith(f"/someone/tiny-m3ae/commit/{hub.commit}")
        assert set(hub.uploaded) == {"config.json", "model.safetensors", "tokenizer.json",
                                     "preprocessor_config.json", "README.md"}  # no train_state.pt
        assert hub.uploaded["model.safetensors"] == (tmp_path / "ckpt" / "model.safetensors").read_bytes()
        assert hub.card_metadata["library_name"] == "m3ae"
        assert "| probe top1 (cifar:val) | 46.5 |" in hub.uploaded["README.md"].decode()
        assert not (tmp_path / "ckpt" / "README.md").exists()  # the card names its repo: uploaded, not kept

        online = _run(features, env, tmp_path)
        assert online.returncode == 0, online.stderr
        assert any(r.startswith("GET /api/models/someone/tiny-m3ae/tree/") for r in hub.requests)
        assert f"GET /someone/tiny-m3ae/resolve/{hub.commit}/model.safetensors" in hub.requests
    repo = tmp_path / "cache" / "models--someone--tiny-m3ae"
    assert (repo / "refs" / "main").read_text() == hub.commit
    assert (repo / "snapshots" / hub.commit / "tokenizer.json").is_symlink()
    offline = _run(features, {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert offline.returncode == 0, offline.stderr
    with torch.no_grad():
        expected = source.features(images=torch.ones(1, 3, 32, 32), captions=["a dog"]).sum().item()
    for run in (online, offline):
        value, std = run.stdout.split(" ", 1)
        assert float(value) == pytest.approx(expected, rel=1e-5) and "0.229" in std


def test_push_exported_and_classifier_folders_with_their_own_cards(tmp_path, monkeypatch):
    """An encoder exported for transformers / timm and a fine-tuned classifier are folders a user
    pushes too; their config.json is not an M3AEConfig, so the card must not read one from it
    (it raised KeyError 'emb_dim')."""
    from huggingface_hub import HfApi
    from hub_mirror import HubMirror

    from m3ae.eval.finetune import Classifier
    from m3ae.interop.export import export

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the mirror is local
    prep = Preprocessing.from_stats(32, "imagenet")
    folders = {fmt: export(_tiny(), prep, fmt, tmp_path / fmt) for fmt in ("hf-vit", "timm")}
    folders["classifier"] = Classifier(_tiny(), 5).save_pretrained(tmp_path / "clf", prep)
    expected = {"hf-vit": ("library_name: transformers", "ViTModel.from_pretrained('someone/enc', "
                                                         "add_pooling_layer=False)", "64 wide x 2 blocks"),
                "timm": ("library_name: timm", "timm.create_model('hf-hub:someone/enc'", "64 wide x 2 blocks"),
                "classifier": ("library_name: m3ae", "Classifier.from_pretrained('someone/enc')", "5 classes")}
    for kind, folder in folders.items():
        with HubMirror("someone/enc") as hub:
            m3ae.hub.push_to_hub(folder, "someone/enc", api=HfApi(endpoint=hub.url, token="hf_local"))
            card = hub.uploaded["README.md"].decode()
            assert hub.card_metadata is not None and "model.safetensors" in hub.uploaded
        for text in expected[kind]:
            assert text in card, (kind, text)
    assert "std [0.229, 0.224, 0.225]" in model_card(folders["classifier"])
    (tmp_path / "clf" / "config.json").write_text('{"kind": "m3ae-classifier"}')  # hand-edited: said, not KeyError
    with pytest.raises(ValueError, match="lacks 'encoder' for a model card"):
        model_card(tmp_path / "clf")


def test_push_of_an_older_checkpoint_uploads_what_load_finds_for_it(tmp_path, monkeypatch):
    """A checkpoint from before tokenizer.json / preprocessor_config.json loads locally with its run
    folder's tokenizer and normalisation; pushed as it was, the Hub copy had neither (CC12M
    statistics and no tokenizer after the download)."""
    from huggingface_hub import HfApi
    from hub_mirror import HubMirror

    from data_files import write_tokenizer
    from m3ae.data.tokenizer import load_tokenizer
    from m3ae.hub import push_to_hub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the mirror is local
    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=256, text_length=16))
    run = tmp_path / "run"
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    ckpt = model.save_pretrained(run / "checkpoints" / "step_00000010")
    (ckpt / "preprocessor_config.json").unlink()  # as older checkpoints were written
    (ckpt / "run_config.yaml").write_text("steps: 10\ndata:\n  normalization: imagenet\n")
    tokenizer.save(str(run / "tokenizer.json"))
    with HubMirror("someone/old") as hub:
        with pytest.warns(UserWarning, match="uploading preprocessor_config.json and tokenizer.json"):
            push_to_hub(ckpt, "someone/old", api=HfApi(endpoint=hub.url, token="hf_local"))
        uploaded = dict(hub.uploaded)
    assert json.loads(uploaded["preprocessor_config.json"])["std"] == [0.229, 0.224, 0.225]
    assert json.loads(uploaded["tokenizer.json"])["model"]["vocab"] == json.loads(tokenizer.to_str())["model"]["vocab"]
    card = uploaded["README.md"].decode()
    assert "std [0.229, 0.224, 0.225]" in card and "steps: 10" in card
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "run_config.yaml"]


def test_card_and_loader_agree_on_what_a_folder_holds(tmp_path):
    # Was: two rules. timm's own hub config.json (architecture + pretrained_cfg, no model_args) was
    # an "encoder exported for timm" to the loader but an M3AE checkpoint to the card ("lacks 'emb_dim'").
    from m3ae.config import ConfigError
    from m3ae.validate import read_model_config

    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224", "num_classes": 0,
                                                      "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    with pytest.raises(ConfigError, match="exported for transformers or timm"):
        read_model_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match="lacks 'model_args'"):
        model_card(tmp_path)


def test_a_push_deletes_model_files_an_earlier_push_left_that_this_folder_lacks(tmp_path, monkeypatch):
    """Was: push only added files, so an image-only model pushed over a repo holding an earlier
    M3AE's tokenizer.json left it there, and the Hub copy loaded with another model's vocabulary.
    Now model files (HUB_FILES) the folder does not give are deleted in the same commit, made on
    the state listed; other files of the repository stay."""
    from huggingface_hub import HfApi
    from hub_mirror import HubMirror

    from data_files import write_tokenizer
    from m3ae.data.tokenizer import load_tokenizer
    from m3ae.hub import HubError, _repo_files, push_to_hub
    from m3ae.interop.export import export

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the mirror is local
    text = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=256, text_length=16))
    text.save_pretrained(tmp_path / "text", tokenizer=load_tokenizer(write_tokenizer(tmp_path)))
    image_only = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=0, text_length=16))
    image_only.save_pretrained(tmp_path / "mae")
    timm = export(_tiny(), Preprocessing.from_stats(32, "imagenet"), "timm", tmp_path / "timm")
    ours = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    theirs = {".gitattributes": b"*.safetensors filter=lfs\n", "notes.md": b"mine",
              "extra/tokenizer.json": b"{}"}  # not a model file of ours: a nested one is another path
    with HubMirror("someone/m", exists=False) as hub:
        api = HfApi(endpoint=hub.url, token="hf_local")
        assert _repo_files(api, "someone/m", None) == (set(), None)  # no repository yet: nothing to delete
        push_to_hub(tmp_path / "text", "someone/m", api=api)
        assert hub.commits[-1]["deleted"] == [] and "tokenizer.json" in hub.files
        hub.files.update(theirs)
        push_to_hub(tmp_path / "mae", "someone/m", api=api)
        assert hub.commits[-1] == {"parent": hub.commit, "added": sorted(ours), "deleted": ["tokenizer.json"]}
        assert set(hub.files) == ours | set(theirs)
        push_to_hub(timm, "someone/m", api=api)  # an encoder for timm: no preprocessor_config.json of its own
        assert hub.commits[-1]["deleted"] == ["preprocessor_config.json"]
        assert set(hub.files) == ours - {"preprocessor_config.json"} | set(theirs)
        push_to_hub(tmp_path / "text", "someone/m", api=api, revision="main")
        assert hub.commits[-1]["deleted"] == [] and set(hub.files) == ours | {"tokenizer.json"} | set(theirs)
        assert len(hub.commits) == 4  # one commit per push: the repo never shows a half state

        # Another push landing between the listing and the commit: refused, nothing deleted unseen.
        listed = api.list_repo_tree

        def list_then_another_push(*args, **kwargs):
            entries = list(listed(*args, **kwargs))
            hub.commit = "1" * 40
            return entries

        monkeypatch.setattr(api, "list_repo_tree", list_then_another_push)
        before = dict(hub.files)
        with pytest.raises(HubError, match="pushing to someone/m failed"):
            push_to_hub(tmp_path / "mae", "someone/m", api=api)
        assert hub.files == before and len(hub.commits) == 4
