"""Pictures of one study arm's model on held-out data: masked reconstructions of images and captions
(the title, the hidden words and the predicted words) and word-to-patch attention for chosen words."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import M3AE
from .evaluate import EvalSpec
from .runner import DONE, Evaluator, arm_config, read_json, run_dir
from .spec import StudySpec


def _arm_and_seed(study: StudySpec, which: str):
    name, _, seed = which.partition("/seed")
    arm = next((a for a in study.arms if a.name == name), None)
    if arm is None:
        raise ValueError(f"--pictures: no arm {name!r}; the study has {[a.name for a in study.arms]}")
    seeds = arm.seeds if arm.seeds is not None else study.seeds
    return arm, int(seed) if seed else seeds[0]


def draw_pictures(study: StudySpec, out: str | Path, which: str, n: int = 6,
                  words: tuple[str, ...] = ("watch", "shoes", "red"), seed: int = 0) -> list[Path]:
    from ..data.tokenizer import load_tokenizer
    from ..viz.attention import attention_analysis, attention_figure, find_token, tokenize_caption
    from ..viz.inputs import decoder_for
    from ..viz.reconstruction import reconstruct, reconstruction_figure

    out = Path(out)
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
    tokenizer = load_tokenizer(config.data.tokenizer)
    data = Evaluator(spec, lambda m: None).captioned(config.data.tokenizer, model.config.image_size,
                                                      model.config.text_length, config.data.normalization)
    stats = config.data.normalization
    written = []
    # Evenly spaced held-out products (shards are ordered by product id: spread them out).
    pick = torch.linspace(0, len(data.keys) - 1, n).round().long()
    g = torch.Generator().manual_seed(seed)
    rec = reconstruct(model, data.images[pick], data.text[pick], data.padding[pick], generator=g)
    path = out / f"reconstruct_{arm.name}.png"
    reconstruction_figure([(f"{arm.name} (seed {s})", rec)], path, decoder_for(tokenizer), stats=stats,
                          title=f"held-out products: 75% of patches and {model.config.text_mask_ratio:.0%} "
                                f"of title words hidden")
    written.append(path)
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
