"""Pictures of one study arm's model on held-out data: masked reconstructions of images and captions
(the title, the hidden words and the predicted words) and word-to-patch attention for chosen words."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..model import M3AE
from .evaluate import EvalSpec
from .runner import DONE, Evaluator, arm_config, read_json, run_dir, study_tokenizer
from .spec import ArmSpec, StudySpec


def _arm_and_seed(study: StudySpec, which: str) -> tuple[ArmSpec, int]:
    name, slash, seed = which.partition("/seed")
    arm = next((a for a in study.arms if a.name == name), None)
    if arm is None:
        raise ConfigError(f"--pictures {which}: no arm {name!r}; the study has {[a.name for a in study.arms]} "
                          "(give ARM or ARM/seedS)")
    seeds = arm.seeds if arm.seeds is not None else study.seeds
    if slash and not seed.isdigit():
        raise ConfigError(f"--pictures {which}: give ARM or ARM/seedS, e.g. {name}/seed{seeds[0]}")
    if slash and int(seed) not in seeds:
        raise ConfigError(f"--pictures {which}: arm {name!r} has seeds {seeds}")
    return arm, int(seed) if slash else seeds[0]


def check_pictures(study: StudySpec, out: str | Path, which: str, trains: list[str] | None = None) -> None:
    """--pictures ARM[/seedS] checked before any training, not after: an arm and seed of the study,
    a model with text, and a study with the tokenizer, masked-words captions and probe task the
    pictures use. `trains`: the arms this command trains (None: all); a run it neither trains nor
    has finished could not be drawn."""
    arm, seed = _arm_and_seed(study, which)
    spec = EvalSpec.from_dict(study.evals)
    if spec.masked_words is None:
        raise ConfigError(f"--pictures {which}: the study has no evals.masked_words (the pictures draw its captions)")
    if not spec.probes:
        raise ConfigError(f"--pictures {which}: the study has no evals.probes task (the t-SNE picture uses the first)")
    config = arm_config(study, arm, seed, study_tokenizer(study, Path(out)))
    if not config.model.has_text:
        raise ConfigError(f"--pictures {which}: arm {arm.name!r} has no text (model.vocab_size 0); "
                          "the pictures need a model with text")
    if not config.data.tokenizer:
        raise ConfigError(f"--pictures {which}: the study names no tokenizer (tokenizer: path or train_from)")
    if trains is not None and arm.name not in trains and read_json(run_dir(Path(out), arm, seed) / DONE) is None:
        raise ConfigError(f"--pictures {which}: that run is not trained yet, and this command does not train it")


def draw_pictures(study: StudySpec, out: str | Path, which: str, n: int = 6,
                  words: tuple[str, ...] = ("watch", "shoes", "red"), seed: int = 0) -> list[Path]:
    from ..data.tokenizer import load_tokenizer
    from ..viz.attention import attention_analysis, attention_figure, find_token, tokenize_caption
    from ..viz.inputs import decoder_for
    from ..viz.reconstruction import reconstruct, reconstruction_figure

    out = Path(out)
    check_pictures(study, out, which)
    arm, s = _arm_and_seed(study, which)
    done = read_json(run_dir(out, arm, s) / DONE)
    if done is None:
        raise ValueError(f"--pictures: {arm.name} seed {s} is not trained yet")
    tokenizer_path = str(out / "tokenizer.json") if (out / "tokenizer.json").is_file() else study.tokenizer.path
    config = arm_config(study, arm, s, tokenizer_path)
    model = M3AE.from_pretrained(out / done["checkpoint"]).eval()
    spec = EvalSpec.from_dict(study.evals)
    if spec.masked_words is None or not model.config.has_text:
        raise ValueError("--pictures needs a model with text and the study's masked_words data")
    if not config.data.tokenizer:
        raise ValueError("--pictures needs the study's tokenizer (OUT/tokenizer.json or tokenizer.path)")
    tokenizer = load_tokenizer(config.data.tokenizer)
    data = Evaluator(spec).captioned(config.data.tokenizer, model.config.image_size, model.config.text_length,
                                     config.data.normalization)
    stats = config.data.normalization
    written = []
    # Evenly spaced held-out products (shards are ordered by product id: spread them out).
    pick = torch.linspace(0, len(data.keys) - 1, n).round().long()
    g = torch.Generator().manual_seed(seed)
    # norm-pix predictions are drawn with each hidden patch's true mean/std (see restore_patch_stats):
    # borrowed statistics paint flat white background cyan, which is the display, not the model.
    restore = "true" if model.config.norm_pix_loss else "local"
    rec = reconstruct(model, data.images[pick], data.text[pick], data.padding[pick], generator=g, restore=restore)
    path = out / f"reconstruct_{arm.name}.png"
    reconstruction_figure([(f"{arm.name} (seed {s})", rec)], path, decoder_for(tokenizer), stats=stats,
                          title=f"held-out products: {model.config.image_mask_ratio:.0%} of patches and "
                                f"{model.config.text_mask_ratio:.0%} of title words hidden"
                                + (" (patch mean/std shown as true)" if restore == "true" else ""))
    written.append(path)
    written.append(conditioned_picture(model, data, pick, decoder_for(tokenizer), stats,
                                       out / f"reconstruct_conditioned_{arm.name}.png", seed))
    written.append(tsne_picture(study, out, ["random", "mae", arm.name], seed=s))
    for word in words:
        for i, caption in enumerate(data.captions):
            tokens = tokenize_caption(tokenizer, caption, model.config.text_length)
            try:
                positions = find_token(tokens, word)
            except ValueError:
                continue
            result = attention_analysis(model, data.images[i], tokens, positions)
            path = out / f"attention_{arm.name}_{word}.png"
            attention_figure(result, path, stats=stats)
            written.append(path)
            break
    return written


def conditioned_picture(model: M3AE, data, pick: torch.Tensor, decode, stats, path: Path, seed: int = 0) -> Path:
    """The same hidden patches rebuilt with the product's own title (all words visible), with no
    title, and with another product's title: does the text change the image guess?"""
    from ..masking import Masks
    from ..viz.reconstruction import draw_masks, reconstruct, reconstruction_figure
    from .evaluate import derangement

    image, text, padding = data.images[pick], data.text[pick], data.padding[pick]
    other = derangement(len(pick), torch.Generator().manual_seed(seed))
    masks = draw_masks(model, image, padding, text_ratio=0.0, seed=seed)
    restore = "true" if model.config.norm_pix_loss else "local"  # as in draw_pictures
    own = reconstruct(model, image, text, padding, masks, restore=restore)
    none = reconstruct(model, image, masks=Masks(masks.image_ids, masks.image_keep), restore=restore)
    swapped_masks = draw_masks(model, image, padding[other], text_ratio=0.0, seed=seed)
    swapped_masks.image_ids, swapped_masks.image_keep = masks.image_ids, masks.image_keep
    swapped = reconstruct(model, image, text[other], padding[other], swapped_masks, restore=restore)
    reconstruction_figure([("its own title", own), ("no title", none), ("another product's title", swapped)],
                          path, decode, stats=stats, title="the same hidden patches, three conditions")
    return path


def tsne_picture(study: StudySpec, out: str | Path, arms: list[str], seed: int = 0) -> Path:
    """t-SNE of up to 1500 held-out images of the 10 most frequent classes of the first probe task,
    mean-pooled features, one panel per arm (those of `arms` that exist and are done)."""
    classes, points = 10, 1500
    import numpy as np

    from ..viz.tsne import FeatureSet, tsne_figure
    from .evaluate import load_probe_sets, pooled_features

    out = Path(out)
    spec = EvalSpec.from_dict(study.evals)
    if not spec.probes:
        raise ValueError("the study has no probe task")
    probe = spec.probes[0]
    panels = []
    sets = None
    for name in arms:
        arm = next((a for a in study.arms if a.name == name), None)
        if arm is None:
            continue
        seeds = arm.seeds if arm.seeds is not None else study.seeds
        s = seed if seed in seeds else seeds[0]
        done = read_json(run_dir(out, arm, s) / DONE)
        if done is None:
            continue
        model = M3AE.from_pretrained(out / done["checkpoint"]).eval()
        config = arm_config(study, arm, s, None)
        if sets is None:
            sets = load_probe_sets(probe, model.config.image_size, config.data.normalization)
            keep = (sets.test_labels < classes).nonzero().squeeze(1)
            g = torch.Generator().manual_seed(0)
            keep = keep[torch.randperm(len(keep), generator=g)[:points]].sort().values
            index = sets.test_index[keep]
            subset = torch.utils.data.Subset(sets.test, index.tolist())
            labels = np.array([sets.classes[int(y)] for y in sets.test_labels[keep]])
        feats = pooled_features(model, subset, ["mean"])["mean"].numpy()
        panels.append((f"{name} (seed {s})", FeatureSet(feats, labels, name)))
    if not panels:
        raise ValueError("no finished arm to draw")
    path = out / f"tsne_{probe.name}.png"
    tsne_figure(panels, path, seed=0)
    return path
