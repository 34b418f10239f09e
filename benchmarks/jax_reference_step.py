"""The authors' M3AE training step, rebuilt in JAX/Flax, proven against their fixtures and timed on
the CPU benchmark config, so "ours vs the authors' JAX implementation" is measured, not quoted.

Commands (run from the repository root):

    # 1. a throwaway JAX environment (CPU wheels; nothing is added to pyproject or to .venv)
    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib flax optax numpy
    #    checked with jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, numpy 2.4.6; optionally also the
    #    fixture's own versions (the same script runs and passes --check on both):
    python3 -m venv /tmp/jaxenv030 && /tmp/jaxenv030/bin/pip install jax==0.4.30 jaxlib==0.4.30 \
        flax==0.8.5 optax==0.2.3 numpy==1.26.4

    # 2. prove it computes what the authors' code computes (tests/fixtures/jax_reference/tiny.npz)
    /tmp/jaxenv/bin/python benchmarks/jax_reference_step.py --check

    # 3. time it on the CPU benchmark config (BENCHMARKS.md "Training step": encoder 192/6/3,
    #    decoder 128/2/4, image 64, patch 8, text 32, vocab 30522, batch 32, captions 8..32 tokens,
    #    12.95 M parameters, 1.431 GFLOP/sample as `m3ae bench train` counts the reference step)
    /tmp/jaxenv/bin/python benchmarks/jax_reference_step.py --steps 20 --warmup 5 --threads 2 --json jax.json

    # 4. our side, same config, same threads. --precision fp32: the 4.5x claim is "eager fp32,
    #    127 samples/s", measured before `--host-allocator auto` became the default (add
    #    --host-allocator system for those conditions; the fast step barely depends on it). The
    #    reference-equivalent torch step runs interleaved in the same process (--no-reference skips it).
    PYTHONPATH=src .venv/bin/python -m m3ae bench train --preset tiny --batch 32 --steps 20 --warmup 5 \
        --threads 2 --precision fp32 --json ours.json \
        model.depth=6 model.image_size=64 model.patch_size=8 model.text_length=32

    # quiet-machine comparison: no OMP_NUM_THREADS / XLA_FLAGS in the environment, the two
    # alternated, three rounds; samples/s = 32 / median step time on both sides
    unset OMP_NUM_THREADS XLA_FLAGS
    for i in 1 2 3; do
      PYTHONPATH=src .venv/bin/python -m m3ae bench train --preset tiny --batch 32 --steps 20 --warmup 5 \
          --threads 2 --precision fp32 --json ours_$i.json \
          model.depth=6 model.image_size=64 model.patch_size=8 model.text_length=32
      /tmp/jaxenv/bin/python benchmarks/jax_reference_step.py --steps 20 --warmup 5 --threads 2 --json jax_$i.json
      /tmp/jaxenv030/bin/python benchmarks/jax_reference_step.py --steps 20 --warmup 5 --threads 2 --json jax030_$i.json
    done
    # optional: the same with --pmap (the authors' train step is a jax.pmap; one CPU device here)

The authors' own pins (jax 0.3.12 for TPU, flax 0.5.0; their requirements.txt) have no CPU wheels
for current Pythons, so the timing is of this rebuild on a recent and on the fixture's jax.

Threads: `--threads N` pins this process to N CPUs (os.sched_setaffinity, before jax is imported;
the same as `taskset -c 0-(N-1)`), which is what sizes XLA's CPU thread pools (they follow the
schedulable CPUs), and with N = 1 also adds `--xla_cpu_multi_thread_eigen=false` to XLA_FLAGS
(Eigen's matmuls single-threaded). Without --threads the process keeps every CPU it was given.
XLA has no flag named intra_op_parallelism_threads (that is a TensorFlow session option); a bare
`intra_op_parallelism_threads=1` token in XLA_FLAGS is ignored. The thread settings in effect are
printed (and written to --json).

What is computed (the authors' m3ae/model.py + m3ae_main.py, as described by the fixture's
tiny.json, DESIGN.md and our reference-equivalent step in src/m3ae/train/bench.py): fp32; text
padded to the full text_length; one random permutation per modality shared by the batch (drawn
in the step: uniform noise, argsort; image before text), the text padding mask gathered with it for
the encoder; explicit softmax attention with padded-key scores replaced by -1e7; tanh GELU; sin-cos
position tables and type embeddings; train mode (deterministic=False: dropout rate 0 is skipped,
but the reference's DropPath at rate 0 still scales each residual branch by floor(1 + u), u drawn
per sample, so this does too); the decoder over every position with the full-length padding
mask; both heads over every position, losses mask-weighted from those outputs; AdamW (b1 0.9,
b2 0.95, eps 1e-8, wd 0.05 with the authors' decay mask) after clip_by_global_norm(1.0) in one
optax chain with a warmup-cosine schedule, applied through a flax TrainState. Patch extraction,
masking, forward, loss, gradient, clipping and the update are one jax.jit'ed function with the
state donated (`--pmap`: jax.pmap over the one CPU device, as the authors' train script does).

Written from the model description (no code copied from young-geng/m3ae_public). The jax/flax
imports live inside functions so the file lints and imports in our torch-only environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO / "tests" / "fixtures" / "jax_reference"
# The authors' no-decay list: a parameter decays unless some component of its path is one of these.
NO_DECAY = ("cls_token", "encoder_image_type_embedding", "encoder_text_type_embedding",
            "decoder_image_type_embedding", "decoder_text_type_embedding", "image_mask_embedding",
            "text_mask_embedding", "text_embedding", "bias", "embedding")


@dataclasses.dataclass(frozen=True)
class Config:
    emb_dim: int
    depth: int
    num_heads: int
    dec_emb_dim: int
    dec_depth: int
    dec_num_heads: int
    mlp_ratio: int = 4
    image_size: int = 256
    patch_size: int = 16
    channels: int = 3
    text_length: int = 64
    vocab_size: int = 30522
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    use_type_embedding: bool = True
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    def keep(self, length: int, ratio: float) -> int:
        return int(length * (1.0 - ratio))  # the authors' truncation


# `m3ae bench train --preset tiny model.depth=6 model.image_size=64 model.patch_size=8
# model.text_length=32` (BENCHMARKS.md, "Training step"): the configuration of the 4.5x claim.
CPU_BENCH = Config(emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128, dec_depth=2, dec_num_heads=4,
                   image_size=64, patch_size=8, text_length=32, vocab_size=30522)


def analytic_flops_per_sample(c: Config) -> float:
    """Training matmul FLOPs per sample in m3ae.perf's convention (2 per multiply-add, 3 x forward)
    for the reference step's shapes: encoder over 1 + kept patches + kept text slots, decoder and
    both heads over every slot. Comparable with `m3ae bench train`'s reference GFLOP/sample."""
    def block(t: float, d: int) -> float:
        return 2 * t * d * (4 * d + 2 * c.mlp_ratio * d) + 4 * t * t * d

    n, length = c.num_patches, c.text_length
    ki, kt = c.keep(n, c.image_mask_ratio), c.keep(length, c.text_mask_ratio)
    te, td = 1 + ki + kt, 1 + n + length
    fwd = (2 * ki * c.patch_dim * c.emb_dim + c.depth * block(te, c.emb_dim) + 2 * te * c.emb_dim * c.dec_emb_dim
           + c.dec_depth * block(td, c.dec_emb_dim) + 2 * n * c.dec_emb_dim * c.patch_dim
           + 2 * length * c.dec_emb_dim * c.vocab_size)
    return 3 * fwd


def tiny_config(info: dict[str, Any]) -> Config:
    m, c = info["config"]["model"], info["config"]
    assert m["output_head_depth"] == 0 and m["drop"] == m["att_drop"] == m["drop_path"] == 0.0
    return Config(emb_dim=m["emb_dim"], depth=m["depth"], num_heads=m["num_heads"], dec_emb_dim=m["dec_emb_dim"],
                  dec_depth=m["dec_depth"], dec_num_heads=m["dec_num_heads"], mlp_ratio=m["mlp_ratio"],
                  image_size=c["image_size"], patch_size=c["patch_size"], channels=c["channels"],
                  text_length=c["text_length"], vocab_size=c["vocab_size"],
                  image_mask_ratio=m["image_mask_ratio"], text_mask_ratio=m["text_mask_ratio"],
                  use_type_embedding=m["use_type_embedding"], image_loss_weight=c["image_loss_weight"],
                  text_loss_weight=c["text_loss_weight"])


# ------------------------------------------------------------------------------------------------
# thread settings: must run before jax is imported
# ------------------------------------------------------------------------------------------------

def apply_threads(threads: int | None) -> dict[str, Any]:
    if threads is not None:
        if threads < 1:
            raise SystemExit("--threads must be >= 1")
        allowed = sorted(os.sched_getaffinity(0))
        if threads > len(allowed):
            raise SystemExit(f"--threads {threads}: only {len(allowed)} CPUs are schedulable here")
        os.sched_setaffinity(0, allowed[:threads])
        if threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    flags = os.environ.get("XLA_FLAGS", "")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1 and "xla_cpu_multi_thread_eigen=false" in flags:
        print(f"warning: {len(cpus)} CPUs but XLA_FLAGS has --xla_cpu_multi_thread_eigen=false "
              "(matmuls run single-threaded)", file=sys.stderr)
    return {"threads_option": threads, "schedulable_cpus": cpus, "XLA_FLAGS": flags,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


# ------------------------------------------------------------------------------------------------
# model, losses, step (jax/flax imported here)
# ------------------------------------------------------------------------------------------------

def build(cfg: Config):  # noqa: C901 - one namespace for the jax side
    import jax
    import jax.numpy as jnp
    import numpy as np
    import flax.linen as nn

    # jax < 0.5's threefry bit layout (the fixture's jax 0.4.30 and the authors' era), so a key draws
    # the same numbers under every jax version (the --check replays the reference's mask draws)
    jax.config.update("jax_threefry_partitionable", False)
    xavier = nn.initializers.xavier_uniform()
    small = nn.initializers.normal(stddev=0.02)

    def sincos(dim: int, positions: np.ndarray) -> np.ndarray:
        """[sin(pos * w), cos(pos * w)], w_i = 10000^(-i / (dim/2)), float32 as the reference."""
        w = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2))
        angle = positions.reshape(-1).astype(np.float32)[:, None] * w[None, :].astype(np.float32)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)

    def pos_1d(dim: int, length: int) -> np.ndarray:
        return sincos(dim, np.arange(length, dtype=np.float32))[None]

    def pos_2d(dim: int, n: int) -> np.ndarray:
        side = int(round(n ** 0.5))
        assert side * side == n
        col, row = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
        # first half of the dims: column (x) index; second half: row (y) index
        return np.concatenate([sincos(dim // 2, col), sincos(dim // 2, row)], axis=1)[None]

    def patchify(images, p: int):
        """(B, H, W, C) -> (B, h*w, p*p*C), patches row-major, (py, px, c) inside a patch."""
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    class SelfAttention(nn.Module):
        dim: int
        heads: int

        @nn.compact
        def __call__(self, x, key_padding):
            b, t, _ = x.shape
            hd = self.dim // self.heads
            qkv = nn.Dense(3 * self.dim, kernel_init=xavier, name="Dense_0")(x)
            qkv = qkv.reshape(b, t, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
            scores = (qkv[0] @ jnp.swapaxes(qkv[1], -1, -2)) * hd ** -0.5
            scores = jnp.where(key_padding[:, None, None, :] > 0, jnp.float32(-1e7), scores)
            probs = jax.nn.softmax(scores, axis=-1)
            self.sow("intermediates", "attention", probs)
            out = (probs @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, t, self.dim)
            return nn.Dense(self.dim, kernel_init=xavier, name="Dense_1")(out)

    class FeedForward(nn.Module):
        dim: int
        hidden: int

        @nn.compact
        def __call__(self, x):
            x = nn.gelu(nn.Dense(self.hidden, kernel_init=xavier, name="fc1")(x))  # tanh form (flax default)
            return nn.Dense(self.dim, kernel_init=xavier, name="fc2")(x)

    class PreNormBlock(nn.Module):
        dim: int
        heads: int
        mlp_ratio: int
        train: bool = False

        def drop_path(self, branch):
            """Stochastic depth at rate 0 in train mode: the reference still draws a per-sample
            uniform and scales the branch by floor(keep + u) / keep (= 1), so we do too."""
            if not self.train:
                return branch
            keep = 1.0  # drop_path = 0.0
            u = jax.random.uniform(self.make_rng("drop_path"), (branch.shape[0],) + (1,) * (branch.ndim - 1))
            return branch / keep * jnp.floor(keep + u)

        @nn.compact
        def __call__(self, x, key_padding):
            x = x + self.drop_path(SelfAttention(self.dim, self.heads, name="Attention_0")(
                nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x), key_padding))
            return x + self.drop_path(FeedForward(self.dim, self.dim * self.mlp_ratio, name="TransformerMLP_0")(
                nn.LayerNorm(epsilon=1e-6, name="LayerNorm_1")(x)))

    class Stack(nn.Module):
        dim: int
        depth: int
        heads: int
        mlp_ratio: int
        train: bool = False

        @nn.compact
        def __call__(self, x, key_padding):
            for i in range(self.depth):
                x = PreNormBlock(self.dim, self.heads, self.mlp_ratio, self.train, name=f"Block_{i}")(x, key_padding)
            return nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)

    class LinearHead(nn.Module):  # output_head_depth = 0: one Dense
        out: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.out, kernel_init=xavier, name="Dense_0")(x)

    def visible(x, perm, keep: int):
        """The batch-shared permutation's first `keep` positions, in permutation order."""
        return jnp.take(x, perm[:keep], axis=1)

    class M3AE(nn.Module):
        c: Config
        train: bool = False  # the reference's deterministic=False (dropout and drop_path are 0 here)

        def setup(self):
            c = self.c
            self.text_embedding = nn.Embed(c.vocab_size, c.emb_dim, embedding_init=nn.initializers.normal(1.0))
            self.image_embedding = nn.Dense(c.emb_dim, kernel_init=xavier)
            if c.use_type_embedding:
                self.encoder_image_type_embedding = self.param("encoder_image_type_embedding", small, (1, 1, c.emb_dim))
                self.decoder_image_type_embedding = self.param("decoder_image_type_embedding", small,
                                                               (1, 1, c.dec_emb_dim))
                self.encoder_text_type_embedding = self.param("encoder_text_type_embedding", small, (1, 1, c.emb_dim))
                self.decoder_text_type_embedding = self.param("decoder_text_type_embedding", small,
                                                              (1, 1, c.dec_emb_dim))
            self.cls_token = self.param("cls_token", small, (1, 1, c.emb_dim))
            self.image_mask_embedding = self.param("image_mask_embedding", small, (1, 1, c.dec_emb_dim))
            self.text_mask_embedding = self.param("text_mask_embedding", small, (1, 1, c.dec_emb_dim))
            self.encoder = Stack(c.emb_dim, c.depth, c.num_heads, c.mlp_ratio, self.train)
            self.decoder = Stack(c.dec_emb_dim, c.dec_depth, c.dec_num_heads, c.mlp_ratio, self.train)
            self.decoder_input_projection = nn.Dense(c.dec_emb_dim, kernel_init=xavier)
            self.decoder_image_output = LinearHead(c.patch_dim)
            self.decoder_text_output = LinearHead(c.vocab_size)

        def _type(self, which: str):
            return getattr(self, which) if self.c.use_type_embedding else 0.0

        def _image_tokens(self, patches):
            return (self.image_embedding(patches) + pos_2d(self.c.emb_dim, patches.shape[1])
                    + self._type("encoder_image_type_embedding"))

        def _text_tokens(self, text):
            return (self.text_embedding(text) + pos_1d(self.c.emb_dim, text.shape[1])
                    + self._type("encoder_text_type_embedding"))

        def _encode(self, parts, pads):
            b = parts[0].shape[0]
            cls = jnp.broadcast_to(self.cls_token, (b, 1, self.c.emb_dim))
            x = jnp.concatenate([cls, *parts], axis=1)
            pad = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), *pads], axis=1)
            return self.encoder(x, pad)

        def representation(self, patches=None, text=None, text_padding=None):
            """The encoder on unmasked input: [cls, image tokens, text tokens]."""
            parts, pads = [], []
            if patches is not None:
                parts.append(self._image_tokens(patches))
                pads.append(jnp.zeros(patches.shape[:2], jnp.float32))
            if text is not None:
                parts.append(self._text_tokens(text))
                pads.append(text_padding)
            return self._encode(parts, pads)

        def __call__(self, patches, text, text_padding, image_perm, text_perm):
            """Masked forward with the given batch-shared permutations (None: no such modality)."""
            c = self.c
            parts, pads, out = [], [], {}
            if patches is not None:
                n, ik = patches.shape[1], c.keep(patches.shape[1], c.image_mask_ratio)
                parts.append(visible(self._image_tokens(patches), image_perm, ik))
                pads.append(jnp.zeros((patches.shape[0], ik), jnp.float32))
                image_restore = jnp.argsort(image_perm)
                out["image_mask"] = jnp.broadcast_to((image_restore >= ik).astype(jnp.float32), patches.shape[:2])
            if text is not None:
                length, tk = text.shape[1], c.keep(text.shape[1], c.text_mask_ratio)
                parts.append(visible(self._text_tokens(text), text_perm, tk))
                pads.append(visible(text_padding, text_perm, tk))
                text_restore = jnp.argsort(text_perm)
                out["text_mask"] = jnp.broadcast_to((text_restore >= tk).astype(jnp.float32), text.shape)
            x = self._encode(parts, pads)
            b = x.shape[0]
            out["encoder_cls"] = x[:, :1]
            y = self.decoder_input_projection(x)  # every encoder output, cls included
            dec, dec_pad, at = [y[:, :1]], [jnp.zeros((b, 1), jnp.float32)], 1
            if patches is not None:
                out["encoder_image"] = x[:, at:at + ik]
                slots = jnp.concatenate(
                    [y[:, at:at + ik], jnp.broadcast_to(self.image_mask_embedding, (b, n - ik, c.dec_emb_dim))], axis=1)
                dec.append(jnp.take(slots, image_restore, axis=1) + pos_2d(c.dec_emb_dim, n)
                           + self._type("decoder_image_type_embedding"))
                dec_pad.append(jnp.zeros((b, n), jnp.float32))
                at += ik
            if text is not None:
                out["encoder_text"] = x[:, at:at + tk]
                slots = jnp.concatenate(
                    [y[:, at:at + tk], jnp.broadcast_to(self.text_mask_embedding, (b, length - tk, c.dec_emb_dim))],
                    axis=1)
                dec.append(jnp.take(slots, text_restore, axis=1) + pos_1d(c.dec_emb_dim, length)
                           + self._type("decoder_text_type_embedding"))
                dec_pad.append(text_padding)  # the full-length padding mask
            z = self.decoder(jnp.concatenate(dec, axis=1), jnp.concatenate(dec_pad, axis=1))
            if patches is not None:
                out["image_output"] = self.decoder_image_output(z[:, 1:1 + n])
            if text is not None:
                out["text_output"] = self.decoder_text_output(z[:, z.shape[1] - length:])
            return out

    def patch_mse(pred, target, masked):
        """Per-patch MSE, averaged over the masked patches of each sample (sum/N over the masked
        share), then over the batch."""
        per_patch = jnp.mean(jnp.square(target - pred), axis=-1)
        per_sample = jnp.mean(jnp.where(masked > 0, per_patch, 0.0), axis=-1)
        return jnp.mean(per_sample / (jnp.sum(masked, axis=-1) / masked.shape[-1]))

    def token_xent(logits, tokens, valid):
        """Cross-entropy and accuracy per sample over valid tokens (count floored at 1e-5), then
        the batch mean (samples without a valid token count as 0)."""
        count = jnp.maximum(jnp.sum(valid, axis=-1), 1e-5)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
        loss = -jnp.mean(jnp.sum(jnp.where(valid > 0, logp, 0.0), axis=-1) / count)
        hits = jnp.where(valid > 0, jnp.argmax(logits, axis=-1) == tokens, False)
        return loss, jnp.mean(jnp.sum(hits, axis=-1) / count)

    def losses(out, patches, text, text_padding):
        image_loss = patch_mse(out["image_output"], patches, out["image_mask"])
        valid = jnp.logical_and(out["text_mask"] > 0, (1.0 - text_padding) > 0).astype(jnp.float32)
        text_loss, text_acc = token_xent(out["text_output"], text, valid)
        total = cfg.image_loss_weight * image_loss + cfg.text_loss_weight * text_loss
        real = jnp.sum(1.0 - text_padding, axis=-1)
        return total, {"loss": total, "image_loss": image_loss, "text_loss": text_loss, "text_accuracy": text_acc,
                       "text_valid": valid, "text_token_ratio": jnp.mean(real / text.shape[-1]),
                       "average_text_length": jnp.mean(real)}

    def decay_mask(params):
        """True where AdamW's weight decay applies (the authors' rule over flattened paths)."""
        from flax import traverse_util
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({k: not any(part in NO_DECAY for part in k) for k in flat})

    def draw_perm(key, length: int):
        """One permutation for the whole batch: argsort of uniform noise (the reference's masking)."""
        return jnp.argsort(jax.random.uniform(key, (length,), dtype=jnp.float32))

    def make_optimizer(schedule):
        import optax
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(learning_rate=schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                                       mask=decay_mask))

    def make_step(model, schedule, perms=None, pmap_axis: str | None = None):
        """(state, rng, batch) -> (state, metrics, rng): patches, masking, forward, loss, grad,
        clip, AdamW update, in train mode (the reference's deterministic=False). `perms`: fixed
        (image, text) permutations (the fixture's) instead of drawing them from rng."""
        train_model = model.clone(train=True)

        def step(state, rng, batch):
            rng, k_image, k_text, k_drop = jax.random.split(rng, 4)
            text, pad = batch["text"], batch["text_padding_mask"]

            def loss_fn(params):
                patches = patchify(batch["image"], cfg.patch_size)
                if perms is None:
                    ip, tp = draw_perm(k_image, patches.shape[1]), draw_perm(k_text, text.shape[1])
                else:
                    ip, tp = perms
                out = train_model.apply(params, patches, text, pad, ip, tp, rngs={"drop_path": k_drop})
                return losses(out, patches, text, pad)

            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            aux = {k: v for k, v in aux.items() if k != "text_valid"}
            if pmap_axis is not None:
                aux, grads = jax.lax.pmean((aux, grads), axis_name=pmap_axis)
            aux["learning_rate"] = schedule(state.step)
            aux["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
            return state.apply_gradients(grads=grads), aux, rng

        if pmap_axis is not None:
            return jax.pmap(step, axis_name=pmap_axis, donate_argnums=(0,))
        return jax.jit(step, donate_argnums=(0,))

    def create_state(params, schedule):
        from flax.training import train_state
        return train_state.TrainState.create(apply_fn=None, params=params, tx=make_optimizer(schedule))

    return dict(jax=jax, jnp=jnp, np=np, M3AE=M3AE, patchify=patchify, pos_1d=pos_1d, pos_2d=pos_2d,
                losses=losses, decay_mask=decay_mask, draw_perm=draw_perm, make_step=make_step,
                create_state=create_state)


def init_params(ns: dict[str, Any], cfg: Config, seed: int):
    """model.init on a zero batch of 2 (as the authors' script)."""
    jax, jnp = ns["jax"], ns["jnp"]
    model = ns["M3AE"](cfg)
    patches = jnp.zeros((2, cfg.num_patches, cfg.patch_dim), jnp.float32)
    text = jnp.zeros((2, cfg.text_length), jnp.int32)
    perm_i, perm_t = jnp.arange(cfg.num_patches), jnp.arange(cfg.text_length)
    params = model.init(jax.random.PRNGKey(seed), patches, text, jnp.zeros((2, cfg.text_length)), perm_i, perm_t)
    return model, params


def versions() -> dict[str, str]:
    import jax
    import jaxlib
    import flax
    import optax
    import numpy
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__,
            "backend": jax.default_backend()}


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extra = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(extra) or 'no avx2'})"


# ------------------------------------------------------------------------------------------------
# --check: the fixture
# ------------------------------------------------------------------------------------------------

def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _find_adam_state(opt_state: Any) -> Any:
    if hasattr(opt_state, "mu") and hasattr(opt_state, "nu"):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            found = _find_adam_state(s)
            if found is not None:
                return found
    if hasattr(opt_state, "inner_state"):
        return _find_adam_state(opt_state.inner_state)
    return None


def run_check(fixture_dir: Path) -> bool:
    import numpy as np

    npz_path, info_path = fixture_dir / "tiny.npz", fixture_dir / "tiny.json"
    info = json.loads(info_path.read_text())
    digest = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    if digest != info["npz_sha256"]:
        print(f"FAIL {npz_path}: sha256 {digest} != {info['npz_sha256']} in tiny.json")
        return False
    with np.load(npz_path, allow_pickle=False) as z:  # numpy arrays only, never pickle
        fx = {k: z[k] for k in z.files}
    cfg = tiny_config(info)
    ns = build(cfg)
    jax, jnp = ns["jax"], ns["jnp"]
    print(f"versions          {versions()}")
    print(f"fixture           {npz_path} (sha256 ok), made with {info['versions']}")
    print(f"config            {cfg}")

    rows: list[tuple[str, float, float]] = []  # (what, max abs diff, tolerance)

    def cmp(name: str, ours: Any, ref: np.ndarray, tol: float) -> None:
        a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        if a.shape != b.shape:
            rows.append((f"{name} SHAPE {a.shape} vs {b.shape}", float("inf"), tol))
            return
        rows.append((name, float(np.max(np.abs(a - b))) if a.size else 0.0, tol))

    def cmp_tree(name: str, ours: dict[str, Any], prefix: str, tol: float) -> None:
        ref = {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}
        flat = _flatten(ours)
        if set(flat) != set(ref):
            rows.append((f"{name} KEYS differ: {sorted(set(flat) ^ set(ref))[:6]}", float("inf"), tol))
            return
        worst = max(float(np.max(np.abs(np.asarray(flat[k], np.float64) - ref[k].astype(np.float64))))
                    for k in ref)
        rows.append((f"{name} ({len(ref)} arrays, max over all)", worst, tol))

    FWD, GRAD = 1e-5, 1e-4

    # structure: a fresh init has exactly the fixture's parameter paths and shapes
    model, fresh = init_params(ns, cfg, 0)
    fresh_shapes = {k: tuple(np.shape(v)) for k, v in _flatten(fresh).items()}
    fixture_shapes = {k: tuple(v.shape) for k, v in fx.items() if k.startswith("params/")}
    n_params = sum(int(np.prod(s)) for s in fresh_shapes.values())
    same = fresh_shapes == fixture_shapes and n_params == info["config"]["num_parameters"]
    rows.append((f"parameter tree: paths/shapes equal, {n_params} parameters", 0.0 if same else float("inf"), 0.0))

    params = _unflatten({k: jnp.asarray(v) for k, v in fx.items() if k.startswith("params/")})
    image, text = jnp.asarray(fx["inputs/image"]), jnp.asarray(fx["inputs/text"])
    pad = jnp.asarray(fx["inputs/text_padding_mask"])
    patches = ns["patchify"](image, cfg.patch_size)

    cmp("inputs/image_patches (patchify)", patches, fx["inputs/image_patches"], 0.0)
    cmp("derived/enc_pos_embed_2d", ns["pos_2d"](cfg.emb_dim, cfg.num_patches), fx["derived/enc_pos_embed_2d"], FWD)
    cmp("derived/dec_pos_embed_2d", ns["pos_2d"](cfg.dec_emb_dim, cfg.num_patches), fx["derived/dec_pos_embed_2d"],
        FWD)
    cmp("derived/enc_pos_embed_1d", ns["pos_1d"](cfg.emb_dim, cfg.text_length), fx["derived/enc_pos_embed_1d"], FWD)
    cmp("derived/dec_pos_embed_1d", ns["pos_1d"](cfg.dec_emb_dim, cfg.text_length), fx["derived/dec_pos_embed_1d"],
        FWD)

    # masking: our draw (uniform(key, (length,)), argsort) from the keys flax's make_rng("noise") gave
    # the reference reproduces its permutations; below, the permutations themselves are replayed
    for m in ("image", "text"):
        key = jnp.asarray(fx[f"masking/{m}_rng_key"])
        drawn = ns["draw_perm"](key, fx[f"masking/{m}_ids_shuffle"].shape[0])
        cmp(f"masking/{m}_ids_shuffle (uniform+argsort of {m}_rng_key)", drawn, fx[f"masking/{m}_ids_shuffle"], 0.0)
        cmp(f"masking/{m}_ids_restore (argsort)", jnp.argsort(jnp.asarray(fx[f"masking/{m}_ids_shuffle"])),
            fx[f"masking/{m}_ids_restore"], 0.0)

    # representations (encoder on unmasked input)
    rep = jax.jit(lambda p, *a: model.apply(p, *a, method="representation"))
    cmp("repr/image_text", rep(params, patches, text, pad), fx["repr/image_text"], FWD)
    cmp("repr/image_only", rep(params, patches, None, None), fx["repr/image_only"], FWD)
    cmp("repr/text_only_via_encoder", rep(params, None, text, pad), fx["repr/text_only_via_encoder"], FWD)

    # the masked call with the fixture's permutations, attention probabilities included
    ip, tp = jnp.asarray(fx["masking/image_ids_shuffle"]), jnp.asarray(fx["masking/text_ids_shuffle"])
    call = jax.jit(lambda p, *a: model.apply(p, *a, mutable=["intermediates"]))
    out, inter = call(params, patches, text, pad, ip, tp)
    for k in ("image_output", "text_output", "image_mask", "text_mask", "encoder_cls", "encoder_image",
              "encoder_text"):
        cmp(f"call/{k}", out[k], fx[f"call/{k}"], FWD)
    for k, v in _flatten(inter["intermediates"]).items():
        name = "call/attention/" + k.removesuffix("/attention")  # sow keeps a tuple of values
        cmp(name, v[0], fx[name], FWD)
    out_i, _ = call(params, patches, None, None, jnp.asarray(fx["call_image_only/image_ids_shuffle"]), None)
    cmp("call_image_only/image_output", out_i["image_output"], fx["call_image_only/image_output"], FWD)
    cmp("call_image_only/image_mask", out_i["image_mask"], fx["call_image_only/image_mask"], 0.0)
    out_t, _ = call(params, None, text, pad, None, jnp.asarray(fx["call_text_only/text_ids_shuffle"]))
    cmp("call_text_only/text_output", out_t["text_output"], fx["call_text_only/text_output"], FWD)
    cmp("call_text_only/text_mask", out_t["text_mask"], fx["call_text_only/text_mask"], 0.0)

    # losses and gradients (jit'ed value_and_grad of the same loss the step uses)
    def loss_fn(p):
        return ns["losses"](model.apply(p, patches, text, pad, ip, tp), patches, text, pad)

    (total, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    for k in ("image_loss", "text_loss", "text_accuracy", "text_valid", "text_token_ratio", "average_text_length"):
        cmp(f"loss/{k}", aux[k], fx[f"loss/{k}"], FWD)
    cmp("loss/total", total, fx["loss/total"], FWD)
    cmp_tree("grads/params", grads["params"], "grads/params/", GRAD)
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    cmp("grads/global_norm", gnorm, fx["grads/global_norm"], GRAD)
    mask = ns["decay_mask"](params)
    cmp_tree("wd_mask (decay mask)", jax.tree_util.tree_map(lambda b: float(b), mask), "wd_mask/", 0.0)

    # 2 AdamW steps with the jit'ed train step, the fixture's schedule, batch and permutations
    import optax
    s = info["optimizer"]["schedule"]
    schedule = optax.warmup_cosine_decay_schedule(init_value=s["init_value"], peak_value=s["peak_value"],
                                                  warmup_steps=s["warmup_steps"], decay_steps=s["decay_steps"],
                                                  end_value=s["end_value"])
    step = ns["make_step"](model, schedule, perms=(ip, tp))
    state = ns["create_state"](jax.tree_util.tree_map(jnp.array, params), schedule)
    batch = {"image": image, "text": text, "text_padding_mask": pad}
    rng = jnp.asarray(fx["masking/noise_key"])
    step_losses, step_lrs = [], []
    for _ in range(info["optimizer"]["steps"]):
        state, metrics, rng = step(state, rng, batch)
        step_losses.append(metrics["loss"])
        step_lrs.append(metrics["learning_rate"])
    cmp("train/loss_per_step", np.stack(step_losses), fx["train/loss_per_step"], GRAD)
    cmp("train/lr_per_step", np.stack(step_lrs), fx["train/lr_per_step"], 1e-9)
    # The attention key bias has an exactly-zero true gradient (a per-query shift of the scores does
    # not change the softmax), so its gradient is rounding noise that Adam normalises into ~lr-sized
    # steps in either implementation: compared apart, against the bound of 2 steps x 2 lr.
    flat = _flatten(state.params["params"])
    key_parts, rest = [], {}
    for name, value in flat.items():
        value = np.asarray(value)
        ref = fx[f"train/step2/params/{name}"]
        if name.endswith("Attention_0/Dense_0/bias"):
            d = value.shape[0] // 3
            key_parts.append(np.abs(value[d:2 * d] - ref[d:2 * d]).max())
            value, ref = np.delete(value, np.s_[d:2 * d]), np.delete(ref, np.s_[d:2 * d])
        rest[name] = float(np.abs(value.astype(np.float64) - ref).max())
    worst = max(rest, key=rest.get)
    rows.append((f"train/step2/params ({len(rest)} arrays, not the key bias; worst: {worst.split('/', 1)[0]})",
                 rest[worst], GRAD))
    rows.append(("train/step2/params key bias (zero true gradient, see above)", float(max(key_parts)),
                 2 * 2 * s["peak_value"]))
    adam = _find_adam_state(state.opt_state)
    cmp_tree("train/step2/adam_mu", adam.mu, "train/step2/adam_mu/", GRAD)
    cmp_tree("train/step2/adam_nu", adam.nu, "train/step2/adam_nu/", GRAD)
    cmp("train/step2/adam_count", adam.count, fx["train/step2/adam_count"], 0.0)

    ok = True
    width = min(64, max(len(r[0]) for r in rows))
    print(f"\n{'compared':<{width}}  max |ours - reference|   tolerance")
    for name, diff, tol in rows:
        good = diff <= tol
        ok &= good
        print(f"{name:<{width}}  {diff:.3e}    {tol:g}{'' if good else '  FAIL'}")
    print(f"\ncheck: {'PASS' if ok else 'FAIL'} ({len(rows)} comparisons)")
    return ok


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def synthetic_pool(cfg: Config, batch: int, pool: int, min_caption: int, max_caption: int, seed: int):
    """Normalised float images (B, H, W, C), captions of uniform length in [min, max] real tokens
    padded to text_length with 0 (padding mask 1.0), like `m3ae bench train`'s batches."""
    import numpy as np

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(pool):
        image = rng.randn(batch, cfg.image_size, cfg.image_size, cfg.channels).astype(np.float32)
        lengths = rng.randint(min_caption, max_caption + 1, size=batch)
        pad = (np.arange(cfg.text_length)[None, :] >= lengths[:, None]).astype(np.float32)
        text = np.where(pad > 0, 0, rng.randint(1, cfg.vocab_size, size=(batch, cfg.text_length))).astype(np.int32)
        out.append({"image": image, "text": text, "text_padding_mask": pad})
    return out


def _spread(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)  # the same 10th/90th percentile rule as m3ae.train.bench
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return pick(0.1), pick(0.9)


def run_timing(args: argparse.Namespace, thread_info: dict[str, Any]) -> dict[str, Any]:
    cfg = dataclasses.replace(CPU_BENCH)
    ns = build(cfg)
    jax, np = ns["jax"], ns["np"]
    import optax

    load_before = os.getloadavg()[0]
    model, params = init_params(ns, cfg, args.seed)
    n_params = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(params))
    # the authors' schedule shape: lr_peak 1.5e-4 x batch/256, warmup then cosine (values do not
    # change the cost)
    peak = 1.5e-4 * args.batch / 256
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 1000, 100000, 0.0)
    state = ns["create_state"](params, schedule)
    max_caption = min(args.max_caption or cfg.text_length, cfg.text_length)
    batches = synthetic_pool(cfg, args.batch, args.pool, args.min_caption, max_caption, args.seed)
    rng = jax.random.PRNGKey(args.seed)
    if args.pmap:
        # a leading device axis of 1 (one CPU device), as the authors' replicate/shard
        lead = lambda tree: jax.device_put(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree))  # noqa: E731
        state, rng, batches = lead(state), lead(rng), [lead(b) for b in batches]
        step = ns["make_step"](model, schedule, pmap_axis="pmap")
    else:
        batches = [jax.device_put(b) for b in batches]
        step = ns["make_step"](model, schedule)

    t0 = time.perf_counter()
    compiled = step.lower(state, rng, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - cost analysis is optional and backend-dependent
        flops = None

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t1 = time.perf_counter()
        state, metrics, rng = compiled(state, rng, batches[i % len(batches)])
        jax.block_until_ready((state, metrics, rng))
        t2 = time.perf_counter()
        losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
        if i >= args.warmup:
            times.append(t2 - t1)
    med = statistics.median(times)
    result = {
        "what": "authors' M3AE training step (JAX/Flax rebuild, benchmarks/jax_reference_step.py)",
        "config": dataclasses.asdict(cfg), "batch": args.batch, "params": n_params,
        "caption_tokens": [args.min_caption, max_caption], "pmap": args.pmap,
        "steps": args.steps, "warmup": args.warmup, "compile_s": compile_s,
        "step_s": med, "step_s_range": _spread(times), "step_s_all": times,
        "samples_per_s": args.batch / med, "xla_flops_per_step": flops,
        "xla_flops_per_sample": flops / args.batch if flops else None,
        "flops_per_sample": analytic_flops_per_sample(cfg),
        "achieved_tflops": analytic_flops_per_sample(cfg) * args.batch / med / 1e12,
        "loss_first_last": [losses[0], losses[-1]], "finite": all(np.isfinite(losses)),
        "versions": versions(), "cpu": cpu_model(), "device": str(jax.devices()[0]),
        "threads": thread_info, "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "command": " ".join([sys.executable, *sys.argv]),
    }
    return result


def format_timing(r: dict[str, Any]) -> str:
    lo, hi = r["step_s_range"]
    t = r["threads"]
    v = r["versions"]
    flops = (f"{r['flops_per_sample'] / 1e9:.3f} GFLOP/sample (analytic, m3ae.perf's convention), achieved "
             f"{r['achieved_tflops']:.3f} TFLOP/s; XLA cost analysis: "
             + (f"{r['xla_flops_per_sample'] / 1e9:.3f}" if r["xla_flops_per_sample"] else "n/a")
             + " GFLOP/sample (version-dependent)")
    return "\n".join([
        f"jax step          {r['samples_per_s']:.1f} samples/s, step {r['step_s'] * 1e3:.1f} ms (median of "
        f"{r['steps']} after {r['warmup']} warm-up, p10-p90 {lo * 1e3:.0f}-{hi * 1e3:.0f} ms), "
        f"{'pmap' if r['pmap'] else 'jit'}, compile {r['compile_s']:.1f} s",
        f"model             M3AE, {r['params'] / 1e6:.2f} M parameters, batch {r['batch']}, captions "
        f"{r['caption_tokens'][0]}..{r['caption_tokens'][1]} tokens padded to {r['config']['text_length']}",
        f"model FLOPs       {flops}",
        f"loss              {r['loss_first_last'][0]:.4f} -> {r['loss_first_last'][1]:.4f} (finite: {r['finite']})",
        f"versions          jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
        f"numpy {v['numpy']}, python {v['python']}, backend {v['backend']}",
        f"cpu               {r['cpu']}",
        f"threads           --threads {t['threads_option']}, schedulable CPUs {t['schedulable_cpus']}, "
        f"XLA_FLAGS={t['XLA_FLAGS']!r}, OMP_NUM_THREADS={t['OMP_NUM_THREADS']}",
        f"load average      {r['load_average_before']:.1f} before, {r['load_average_after']:.1f} after (1-min)",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare against the authors' fixture and exit")
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURES,
                    help="folder with tiny.npz and tiny.json (default tests/fixtures/jax_reference)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation is separate)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-caption", type=int, default=8, help="shortest synthetic caption (tokens)")
    ap.add_argument("--max-caption", type=int, default=None, help="longest caption (default text length)")
    ap.add_argument("--pool", type=int, default=8, help="distinct pre-placed batches cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="pin to N CPUs before jax loads (XLA's pools follow); N=1 also sets "
                         "--xla_cpu_multi_thread_eigen=false. Default: every CPU given")
    ap.add_argument("--pmap", action="store_true", help="jax.pmap over one device, as the authors' train script")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.pool < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --pool >= 1")
    if not 1 <= args.min_caption <= CPU_BENCH.text_length:
        ap.error(f"--min-caption must be in [1, {CPU_BENCH.text_length}]")
    thread_info = apply_threads(args.threads)
    if args.check:
        return 0 if run_check(args.fixture) else 1
    result = run_timing(args, thread_info)
    print(format_timing(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
