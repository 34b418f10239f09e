import pytest
import torch

from _eval_util import tiny_model
from m3ae.eval.fast_probe import fast_probe, fit_logistic
from m3ae.eval.features import extract_features, load_features, pool_tokens, save_features
from m3ae.eval.finetune import Classifier, layer_decay_groups, mix_batch
from m3ae.eval.knn import knn_accuracy, topk_accuracy
from m3ae.eval.lars import LARS, lars_param_groups
from m3ae.eval.linear_probe import ProbeHead
from m3ae.eval.ood import Mahalanobis, auroc, ood_scores


def _separable(n=400, d=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 4
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, n, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_features_are_deterministic_and_match_encode(tmp_path):
    model = tiny_model()
    model.train()  # extraction must switch to eval itself, and restore the mode
    ds = _ImageSet(10)
    a, labels = extract_features(model, ds, "cls", batch_size=4)
    b, _ = extract_features(model, ds, "cls", batch_size=3)
    assert model.training
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        model.eval()
        tokens = model.encode(ds.x)
    assert torch.allclose(a, tokens[:, 0], atol=1e-5)
    mean, _ = extract_features(model, ds, "mean", batch_size=4)
    assert torch.allclose(mean, tokens[:, 1: 1 + model.config.num_patches].mean(1), atol=1e-5)
    assert torch.equal(labels, ds.y)
    for suffix in (".safetensors", ".npz", ".npy"):
        path = save_features(tmp_path / f"f{suffix}", a, labels, [f"k{i}" for i in range(10)])
        f, l, k = load_features(path)
        assert torch.equal(f, a) and torch.equal(l, labels) and k[3] == "k3"
        assert f.dtype == torch.float32 and l.dtype == torch.int64


def test_text_mean_pool_ignores_padding():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    out = pool_tokens(tokens, "mean", 0, pad)
    assert out[:, 0].tolist() == [1.5, 5.0]


def test_fast_probe_separable_and_shuffled():
    x, y = _separable()
    vx, vy = _separable(seed=1)
    vx = x[:200] + 0.1 * torch.randn(200, 16)
    vy = y[:200]
    for method in ("logistic", "ridge"):
        assert fast_probe(x, y, vx, vy, method=method)["top1"] > 97
    g = torch.Generator().manual_seed(3)
    noise, noise_val = torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g)
    chance = fast_probe(noise, torch.randint(0, 5, (1000,), generator=g), noise_val,
                        torch.randint(0, 5, (1000,), generator=g))["top1"]
    assert abs(chance - 20) < 6


def _noisy(n: int, seed: int, d: int = 24, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=torch.Generator().manual_seed(99))  # one task, many samples
    x = torch.randn(n, d, generator=g)
    return x, (x @ w + 3 * torch.randn(n, classes, generator=g)).argmax(1)


def test_cross_validated_l2_holds_out_every_sample_once():
    x, y = _noisy(600, 0)
    vx, vy = _noisy(400, 1)
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    cv = fast_probe(x, y, vx, vy, l2_grid=grid, folds=4, max_iter=100)
    assert cv["folds"] == 4 and set(cv["sweep"]) == {str(v) for v in grid}
    # Each score is a hit count over all 600 held-out samples (one fold each), not a 20 % share.
    assert all(abs(v * 6 - round(v * 6)) < 1e-9 for v in cv["sweep"].values())
    assert cv["l2"] == max(grid, key=lambda v: (cv["sweep"][str(v)], v))
    with pytest.raises(ValueError, match="folds must be an integer >= 1, got 0"):
        fast_probe(x, y, vx, vy, folds=0)
    with pytest.raises(ValueError, match="folds=601 but only 600 training features"):
        fast_probe(x, y, vx, vy, folds=601)


def test_a_warm_started_fit_reaches_the_cold_optimum():
    x, y = _noisy(500, 2)
    start = fit_logistic(x, y, 6, 1e-3, max_iter=300)
    cold = fit_logistic(x, y, 6, 1e-1, max_iter=300)
    warm = fit_logistic(x, y, 6, 1e-1, max_iter=300, init=start)
    assert torch.allclose(warm.weight, cold.weight, atol=1e-4) and torch.allclose(warm.bias, cold.bias, atol=1e-4)
    assert not torch.allclose(start.weight, cold.weight, atol=1e-2)  # it did move: a different optimum


def _objective(model, x, y, l2):
    z = (x.double() - model.mean.double()) / model.std.double()
    w = model.weight.double()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(z @ w + model.bias.double(), y) + 0.5 * l2 * (w * w).sum())


def test_the_preconditioned_solver_reaches_the_plain_optimum_in_fewer_iterations():
    # Features as real encoders give them: correlated, one direction carrying most of the variance,
    # one exactly redundant (a LayerNorm output's coordinates sum to a constant).
    g = torch.Generator().manual_seed(4)
    base = torch.randn(800, 12, generator=g) * torch.logspace(0, -2, 12)
    x = torch.cat([base @ torch.randn(12, 23, generator=g) + 0.05 * torch.randn(800, 23, generator=g),
                   base[:, :1]], 1)
    x[:, -1] = -x[:, :-1].sum(1)
    y = (10 * base @ torch.randn(12, 5, generator=g) + torch.randn(800, 5, generator=g)).argmax(1)
    for l2 in (1e-5, 1e-3, 1e-2):
        plain = fit_logistic(x, y, 5, l2, max_iter=3000, precondition=False)
        pre = fit_logistic(x, y, 5, l2, max_iter=3000)
        assert plain.converged and pre.converged
        assert abs(_objective(pre, x, y, l2) - _objective(plain, x, y, l2)) < 1e-6, l2
        a, b = pre.logits(x), plain.logits(x)
        assert (a - b).abs().max() < 1e-3 * a.abs().max(), l2  # a flat optimum (weak L2): the same to 1e-3
        assert not pre.weight.requires_grad and not plain.weight.requires_grad
        # The same budget gets closer to the optimum (the iteration counts to convergence are not
        # comparable: the gradient tolerance is met in different coordinates).
        for budget in (10, 20):
            short_plain = fit_logistic(x, y, 5, l2, max_iter=budget, precondition=False)
            short_pre = fit_logistic(x, y, 5, l2, max_iter=budget)
            best = _objective(plain, x, y, l2)
            assert _objective(short_pre, x, y, l2) - best < (_objective(short_plain, x, y, l2) - best) / 3
    # A warm start is mapped into the preconditioned coordinates: started at the optimum, it stays.
    again = fit_logistic(x, y, 5, 1e-2, max_iter=5, init=pre)
    assert abs(_objective(again, x, y, 1e-2) - _objective(pre, x, y, 1e-2)) < 1e-7
    assert abs(pre.objective(x, y, 1e-2) - _objective(pre, x, y, 1e-2)) < 1e-12  # the library's own, the same


def test_the_probe_says_whether_its_solver_converged():
    # A probe cut off by max_iter (or by the line searches' 1.25 x max_iter evaluations) reports a
    # top-1 that moves with the features' last bits; it must say so, not pass for the optimum's.
    x, y = _noisy(500, 3)
    cut = fast_probe(x, y, x, y, l2_grid=[1e-6], max_iter=5)
    assert cut["converged"] is False and cut["iterations"] <= 5
    full = fast_probe(x, y, x, y, l2_grid=[1e-1], max_iter=500)
    assert full["converged"] is True and full["iterations"] < 500
    assert fast_probe(x, y, x, y, l2_grid=[1e-1], method="ridge")["converged"] is True


def test_knn_separable_and_shuffled():
    x, y = _separable()
    vx = x[:100] + 0.1 * torch.randn(100, 16)
    assert knn_accuracy(x, y, vx, y[:100])["top1"] > 97
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    vx2, vy2 = _separable(seed=5)
    assert abs(knn_accuracy(x, shuffled, vx2, vy2)["top1"] - 20) < 8


def test_topk_accuracy_is_the_exact_share():
    # 30 hits of 100: a float32 mean reported 30.000001192092896 in every result file
    labels = torch.zeros(100, dtype=torch.long)
    scores = torch.zeros(100, 2)
    scores[:30, 0] = 1.0
    scores[30:, 1] = 1.0
    acc = topk_accuracy(scores, labels, ks=(1, 5))
    assert acc == {"top1": 30.0, "top5": 100.0}


def test_lars_groups_and_step():
    head = ProbeHead(8, 3)
    groups = lars_param_groups(head)
    assert [len(g["params"]) for g in groups] == [1, 1]  # weight adapts; bias does not; BN has no params
    assert groups[0]["params"][0] is head.linear.weight and not groups[1]["lars_adapt"]
    opt = LARS(groups, lr=1.0, momentum=0.0)
    w0 = head.linear.weight.detach().clone()
    head.linear.weight.grad = torch.ones_like(w0)
    head.linear.bias.grad = torch.ones(3)
    opt.step()
    # adapted step has norm trust * ||w||; bias takes the plain step
    assert torch.allclose(torch.linalg.vector_norm(head.linear.weight - w0), 1e-3 * torch.linalg.vector_norm(w0))
    assert torch.allclose(head.linear.bias, -torch.ones(3))


def test_layer_decay_groups():
    model = Classifier(tiny_model(depth=3), 4)
    groups = layer_decay_groups(model, 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["norm.weight"]["lr_scale"] == 1.0
    assert by_name["encoder.encoder.norm.weight"]["lr_scale"] == 1.0
    assert by_name["encoder.encoder.blocks.2.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert by_name["encoder.encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** 3
    assert by_name["encoder.cls_token"]["lr_scale"] == 0.5 ** 4
    assert by_name["encoder.image_embedding.weight"]["lr_scale"] == 0.5 ** 4
    assert by_name["encoder.cls_token"]["weight_decay"] == 0.0
    assert by_name["encoder.encoder.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["head.weight"]["weight_decay"] == 0.05
    assert not any("decoder" in n for n in by_name)  # the decoder is gone
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mixup_targets_sum_to_one():
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)):
        mixed, target = mix_batch(images, labels, 3, mixup, cutmix, smoothing=0.1)
        assert mixed.shape == images.shape and torch.allclose(target.sum(1), torch.ones(6))


def test_auroc_and_ood_scores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, generator=g), torch.randn(2000, generator=g)
    assert abs(auroc(a, b) - 0.5) < 0.03
    assert auroc(a + 10, b) > 0.999 and auroc(a - 10, b) < 0.001
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5  # ties count half
    x, y = _separable(d=8)
    far = torch.randn(300, 8, generator=g) * 0.5 + 40
    logits = torch.randn(len(x), 5)
    aucs, _ = ood_scores(x, y, x[:300], far, logits[:300], logits[:300])
    assert aucs["mahalanobis"] > 0.99 and abs(aucs["max_softmax"] - 0.5) < 1e-9
    same, _ = ood_scores(x, y, x[:200], x[200:], logits[:200], logits[200:])
    assert abs(same["mahalanobis"] - 0.5) < 0.1
    maha = Mahalanobis.fit(x, y)
    assert maha.score(maha.means.float()).abs().max() < 1e-3


def test_probe_and_knn_refuse_features_they_cannot_score():
    import pytest

    x, y = torch.randn(12, 4), torch.tensor([0, 1, 2] * 4)
    unlabelled = torch.full((12,), -1)  # what m3ae embed writes for data without labels
    for score in (lambda *a, **k: fast_probe(*a, **k), lambda *a, **k: knn_accuracy(*a, k=3, **k)):
        with pytest.raises(ValueError, match="label -1: unlabelled features"):
            score(x, unlabelled, x, y)
        with pytest.raises(ValueError, match="validation set has 0 features"):
            score(x, y, x[:0], y[:0])
        with pytest.raises(ValueError, match="label 2 is out of range for num_classes=2"):
            score(x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="l2_grid is empty"):
        fast_probe(x, y, x, y, l2_grid=[])
