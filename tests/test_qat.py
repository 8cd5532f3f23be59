"""QAT: the straight-through estimator through the weight fold, distillation, the schedule, and resume."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from adderquant.data import Dataset, normalize
from adderquant.data.augment import crop_flip
from adderquant.nn import AdderConv2d
from adderquant.nn.functional import adder_conv2d_latent
from adderquant.quant import QATConfig, QuantAdderConv2d, QuantConfig, qat, quantize
from adderquant.quant.qat import distillation_loss, holdout_split, unfold_weights
from adderquant.quant.uniform import fake_quantize, quantize_int

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               AdderConv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               AdderConv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


def _data(n=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = (x.float().mean((1, 2, 3)) > 127).long() + 2 * (x[:, 0].float().mean((1, 2)) > 127).long()
    return Dataset("toy", x, y, x[:40], y[:40], ["0", "1", "2", "3"], "memory")


def _calib(ds):
    return (ds.x_train.float() / 255 - 0.5) / 0.25


def test_latent_gradients_equal_the_adder_rules_in_float64():
    """Forward with the clamped weights; backward ∂X = Σ G·HardTanh(W_latent − X), ∂W = Σ G·(X − W_latent)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    latent = (3 * torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    used = latent.detach().clamp(0, 1)
    y = adder_conv2d_latent(x, used, latent, 1, 0, 1)
    gout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gout)
    xu = F.unfold(x.detach(), 2)  # (N, K, P)
    wl = latent.detach().flatten(1)  # (O, K)
    ref_y = -(xu.unsqueeze(1) - used.flatten(1)[None, :, :, None]).abs().sum(2).view_as(y)
    diff = xu.unsqueeze(1) - wl[None, :, :, None]  # (N, O, K, P): X − W_latent
    gflat = gout.flatten(2).unsqueeze(2)  # (N, O, 1, P)
    ref_gw = (gflat * diff).sum((0, 3)).view_as(latent)
    ref_gx = F.fold((gflat * torch.clamp(-diff, -1, 1)).sum(1), (4, 4), 2)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(latent.grad, ref_gw)
    torch.testing.assert_close(x.grad, ref_gx)


def test_latent_weights_keep_the_codes_learned_rounding_chose():
    """QAT of a model with learned rounding starts from that model: the latent weights round to the learned
    codes, not back to nearest rounding of the float weights."""
    model, ds = _net(), _data()
    config = QuantConfig.ours_fast(4, learned_rounding=40)
    result = quantize(model, _calib(ds), config)
    nearest = quantize(model, _calib(ds), config.with_(learned_rounding=0)).model
    q = result.model.eval()
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantAdderConv2d)}
    codes = {n: m.int_weight().clone() for n, m in layers.items()}
    moved = sum(int((c != nearest.get_submodule(n).int_weight()).sum()) for n, c in codes.items())
    assert moved == sum(v["changed"] for v in result.rounding.values() if v["kept"]) > 0
    x = _calib(ds)[:16]
    with torch.no_grad():
        ref = q(x)
        unfold_weights(q, model)
        assert all(torch.equal(m.int_weight(), codes[n]) for n, m in layers.items())
        assert torch.equal(q(x), ref)


@pytest.mark.parametrize("method", ["paper", "ours", "authors"])
def test_unfold_keeps_the_function_and_fold_restores_the_layer(method):
    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.paper(4) if method == "paper" else
                 getattr(QuantConfig, method)(4)).model.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = _calib(ds)[:16]
    with torch.no_grad():
        ref = q(x)
        assert unfold_weights(q, model) == 2
        assert torch.equal(q(x), ref)  # Theorem 1: same function with the latent weights
        latent = [m.weight.detach().clone() for m in q.modules() if isinstance(m, QuantAdderConv2d)]
        assert any(not torch.equal(a, before[k]) for a, k in zip(latent, ("3.weight", "6.weight"), strict=True))
        for m in q.modules():
            if isinstance(m, QuantAdderConv2d):
                m.fold()
        assert torch.equal(q(x), ref)
    after = q.state_dict()
    for k, v in before.items():  # the fold bias and clamped weights come back to float rounding
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-5)


def test_latent_weights_keep_the_input_gradient_of_the_float_layer():
    """The unsigned grid clamps every negative weight to 0; the latent backward sees the float weights."""
    torch.manual_seed(1)
    layer = AdderConv2d(8, 8, 3, padding=1).eval()
    x = torch.rand(4, 8, 6, 6)
    q = quantize(torch.nn.Sequential(layer), x, QuantConfig.ours_fast(4, bn_correction=None, range_search=False)).model
    qa = q[0]
    xin = x.clone().requires_grad_()
    layer.train()
    layer(xin).sum().backward()
    g_float = xin.grad.clone()
    unfold_weights(q, torch.nn.Sequential(layer))
    q.train()
    xin.grad = None
    qa(xin).sum().backward()
    inside = (x > 0) & (x < qa.ranges.max())  # the activation STE passes gradients inside the range only
    cos = F.cosine_similarity(xin.grad[inside], g_float[inside], dim=0)
    assert cos > 0.95


def test_fake_quantize_has_the_ste_and_lsq_gradients_in_float64():
    """Value: ``quantize_int(v, s)·s`` bit for bit. Gradients: ``g`` inside the grid, 0 outside; for a
    learning scale ``Σ g·(round(v/s) − v/s)`` inside and ``Σ g·q`` at the clipped edge q."""
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    s = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    y = fake_quantize(v, s, 3, signed=True)
    assert torch.equal(y.detach(), quantize_int(v.detach(), s.detach(), 3, True) * s.detach())
    gout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gout)
    t = v.detach() / 0.4
    codes = torch.round(t)
    inside = (codes >= -4) & (codes <= 3)
    torch.testing.assert_close(v.grad, gout * inside, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, (gout * torch.where(inside, codes - t, codes.clamp(-4, 3))).sum())


def test_learned_ranges_get_the_lsq_gradient_and_fold_exactly():
    """One range parameter per shared range; its gradient is the LSQ chain through the activation grid
    only (the weight side sees it as a constant); fold() stores the learned range and keeps the function."""
    torch.manual_seed(1)
    layer = AdderConv2d(6, 4, 3, padding=1).eval()
    with torch.no_grad():
        layer.weight.mul_(20)  # weights beyond the activation range, as in trained AdderNets
    x = torch.rand(3, 6, 5, 5) * 2
    q = quantize(torch.nn.Sequential(layer), x, QuantConfig.ours_fast(4, bn_correction=None, range_search=False)).model
    unfold_weights(q, torch.nn.Sequential(layer))
    qa = q[0].double()
    qa.learn_ranges()
    assert qa.range_values.numel() == 1  # every group shares r_x: one parameter
    qa.train()
    x64 = x.double()
    y = qa(x64)
    gout = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gout)
    (r,) = qa.range_values.detach().clone()
    s = r / 15
    t = x64 / s
    codes = torch.round(t)
    inside = (codes <= 15) & (codes >= 0)
    xq = (codes.clamp(0, 15) * s).requires_grad_()
    w_used = (qa.int_weight() * qa.channel_scales().view(-1, 1, 1, 1)).detach()
    ref = adder_conv2d_latent(xq, w_used, qa.weight.detach().clone().requires_grad_(), 1, 1, 1)
    torch.testing.assert_close(y.detach(), ref.detach() + qa.fold_bias().double().view(1, -1, 1, 1))
    ref.backward(gout)
    lsq = (x64[0].numel() * 15) ** -0.5 / 15  # LSQ's gradient scale, then ds/dr = 1/(2^b − 1)
    want = (xq.grad * torch.where(inside, codes - t, codes.clamp(0, 15))).sum() * lsq
    torch.testing.assert_close(qa.range_values.grad[0], want)
    with torch.no_grad():
        qa.range_values.mul_(0.8)  # a learned step: a smaller range
        qa.eval()
        moved = qa(x64)
        qa.fold()
    assert not qa.latent and "range_values" not in dict(qa.named_parameters())
    torch.testing.assert_close(qa.ranges, torch.full_like(qa.ranges, float(r) * 0.8))
    with torch.no_grad():
        torch.testing.assert_close(qa(x64), moved)


def test_distillation_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    alpha, temp = 0.7, 2.0
    ps = torch.softmax(s / temp, 1)
    pt = torch.softmax(t / temp, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(2), y].mean()
    expected = (1 - alpha) * ce + alpha * temp**2 * kl
    torch.testing.assert_close(distillation_loss(s, y, t, alpha, temp), expected)
    torch.testing.assert_close(distillation_loss(s, y, t, 0.0, temp), ce)


def _warm(model, ds):
    """BatchNorm statistics of the toy data (the untrained defaults leave the second adder's input all 0)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # a cumulative average: one pass gives the batch's statistics
    with torch.no_grad():
        model.train()(_calib(ds))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _qat_run(tmp_path, epochs, resume=False, **kw):
    ds = _data()
    model = _warm(_net(), ds)
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model
    cfg = QATConfig(epochs=epochs, lr=0.02, batch_size=16, distill=0.5, schedule="step", holdout=16,
                    checkpoint=str(tmp_path / "qat.pt"), resume=resume, log_path=str(tmp_path / "log.jsonl"),
                    eval_limit=40, **kw)
    log = qat(q, ds, NORM, cfg, float_model=model)
    return q, log


@pytest.mark.parametrize(("range_lr", "keep_best"), [(0.0, False), (20.0, False), (0.0, True)])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, range_lr, keep_best):
    full, full_log = _qat_run(tmp_path / "a", 3, range_lr=range_lr, keep_best=keep_best)
    import importlib

    qat_module = importlib.import_module("adderquant.quant.qat")

    real, calls = qat_module.sgd_epoch, []

    def killed_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies during the third epoch
        return real(*args, **kwargs)

    monkeypatch.setattr(qat_module, "sgd_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _qat_run(tmp_path / "b", 3, range_lr=range_lr, keep_best=keep_best)
    monkeypatch.setattr(qat_module, "sgd_epoch", real)
    assert torch.load(tmp_path / "b" / "qat.pt", weights_only=True)["epoch"] == 2
    with pytest.raises(ValueError, match="different QAT configuration"):
        _qat_run(tmp_path / "b", 4, resume=True, range_lr=range_lr, keep_best=keep_best)  # other options
    resumed, log = _qat_run(tmp_path / "b", 3, resume=True, range_lr=range_lr, keep_best=keep_best)
    if range_lr:
        lo, hi = full_log[-1]["range_ratio"]
        assert lo < 0.999 or hi > 1.001  # the ranges did move
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    def untimed(entries):
        return [{k: v for k, v in e.items() if not k.startswith("seconds")} for e in entries]

    assert untimed(log) == untimed(full_log)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2, 3] and "holdout_top1" in lines[0]


def _holdout_score(model, ds, holdout=16):
    from adderquant.evaluate import evaluate

    _, held = holdout_split(len(ds.y_train), holdout, 0)
    r = evaluate(model, ds.x_train[held], ds.y_train[held], NORM)
    return r.top1, r.loss


# kept: an earlier epoch; the start (lr too high); the start again, though epoch 3 has a higher top-1 (NaN loss)
@pytest.mark.parametrize(("lr", "kept"), [(0.5, 1), (5.0, 0), (500.0, 0)])
def test_keep_best_returns_the_best_held_out_state_the_start_included(lr, kept):
    """The returned model scores, on the held-out images, the best of the start and every epoch (top-1,
    then loss); when that is the start, it is the quantized model QAT was given, bit for bit."""
    ds = _data()
    model = _warm(_net(), ds)
    # a fixed recipe (ours-fast at 4 bits and the QAT BatchNorms when the three cases were found), not the
    # presets, which the held-out selections may change: the cases depend on this tiny model's trajectory
    q = quantize(model, _calib(ds), QuantConfig.paper_unsigned(4, bn_correction="mean")).model
    given = copy.deepcopy(q)
    cfg = QATConfig(epochs=3, lr=lr, batch_size=16, distill=0.5, holdout=16, keep_best=True, eval_limit=0,
                    freeze_bn=False)
    log = qat(q, ds, NORM, cfg, float_model=model)
    scored = [(0, log[0]["start_holdout_top1"], log[0]["start_holdout_loss"])] + \
             [(e["epoch"], e["holdout_top1"], e["holdout_loss"]) for e in log]
    finite = [t for t in scored if t[2] == t[2]]  # a NaN loss (diverged) never wins
    best = max(finite, key=lambda t: (t[1], -t[2]))  # max keeps the first of equals: the earlier state
    assert log[-1]["best_epoch"] == best[0] == kept
    top1, loss = _holdout_score(q, ds)
    assert top1 == pytest.approx(best[1]) and loss == pytest.approx(best[2], rel=1e-4, abs=1e-6)
    if best[0] == 0:
        for (k, a), b in zip(given.state_dict().items(), q.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    assert top1 >= log[0]["start_holdout_top1"]


def test_keep_best_without_held_out_images_is_refused():
    with pytest.raises(ValueError, match="keep_best .* needs holdout"):
        QATConfig(epochs=1, keep_best=True)


def test_per_step_schedule_ends_near_zero_and_holdout_is_disjoint():
    _, held = holdout_split(100, 20, 0)
    keep, _ = holdout_split(100, 20, 0)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(held) == 20
    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model
    log = qat(q, ds, NORM, QATConfig(epochs=2, lr=0.01, batch_size=16, schedule="step", eval_limit=0),
              float_model=model)
    assert log[-1]["lr"] < 0.01 * 0.01 and "test_top1" not in log[-1]


def test_final_bn_reestimation_sees_crops_of_the_raw_training_images():
    """``bn_reestimate``: the last batches through the model (BatchNorms alone in training mode) are
    normalised crops of raw training images, padded with black — what the float model's statistics
    were measured on — and their exact statistics become the running ones."""
    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model
    seen = []
    bns = [m for m in q.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    q.register_forward_pre_hook(lambda m, inp: seen.append((m.training, bns[0].training, inp[0].detach().clone())))
    qat(q, ds, NORM, QATConfig(epochs=1, lr=0.01, batch_size=16, bn_reestimate=3, eval_limit=0, distill=0),
        float_model=model)
    batches = [x for top, bn, x in seen if bn and not top]
    assert len(batches) == 3 and all(len(x) == 16 for x in batches)
    crops = []
    n = len(ds.x_train)
    for dy, dx, f in itertools.product(range(9), range(9), (False, True)):
        raw = crop_flip(ds.x_train, torch.full((n,), dy), torch.full((n,), dx), torch.full((n,), f), 4)
        crops.append(normalize(raw, *NORM))
    crops = torch.cat(crops)
    for img in torch.cat(batches):
        assert (crops == img).flatten(1).all(1).any()
    recorded = []
    h = bns[-1].register_forward_pre_hook(lambda m, inp: recorded.append(inp[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            q(x)
    h.remove()
    x = torch.cat(recorded)
    torch.testing.assert_close(bns[-1].running_mean.double(), x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bns[-1].running_var.double(), x.var((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_keeps_the_ptq_statistics_and_trains_the_affine_parameters():
    model, ds = _net(), _data()
    start = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model

    def batchnorms(m):
        return [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

    runs = {}
    for frozen in (True, False):
        q = copy.deepcopy(start)
        qat(q, ds, NORM, QATConfig(epochs=1, lr=0.05, batch_size=16, eval_limit=0, freeze_bn=frozen),
            float_model=model)
        runs[frozen] = q
    for a, b, c in zip(batchnorms(start), batchnorms(runs[True]), batchnorms(runs[False]), strict=True):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
        assert not torch.equal(a.weight, b.weight)  # the affine parameters trained
        assert not torch.equal(a.running_mean, c.running_mean)  # in training mode the statistics move


def test_qat_config_refuses_bad_recipes():
    for kw, msg in (({"distill": 1.5}, "distill"), ({"temperature": 0.0}, "temperature"),
                    ({"schedule": "linear"}, "schedule"), ({"resume": True}, "checkpoint")):
        with pytest.raises(ValueError, match=msg):
            QATConfig(**kw)
    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model
    with pytest.raises(ValueError, match="float model"):
        qat(q, ds, NORM, QATConfig(epochs=1))


def test_a_qat_model_exports_and_runs_bit_exact_in_integers():
    """After QAT (latent weights folded back) the exported graph equals the float64 fake-quant model."""
    from adderquant.integer import AQZ, IntegerEngine, NumpyRuntime, convert
    from adderquant.integer.float64 import float64_reference

    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4, quantize_first_last=True)).model
    qat(q, ds, NORM, QATConfig(epochs=1, lr=0.05, batch_size=16, eval_limit=0), float_model=model)
    assert not any(m.latent for m in q.modules() if isinstance(m, QuantAdderConv2d))
    x = ds.x_test[:8]
    g = convert(q, NORM, input_shape=(3, 8, 8))
    logits = IntegerEngine(g)(x)
    with torch.no_grad():
        ref64 = float64_reference(q)((x.float() / 255 - 0.5) / 0.25)
    assert torch.equal(logits.argmax(1), ref64.argmax(1))
    assert float((logits.double() * 2.0**-g.frac_bits - ref64).abs().max()) < 1e-6
    got = NumpyRuntime(AQZ(g.to_json(), g.tensors)).logits(x.numpy())
    assert (got == logits.numpy()).all()


def test_a_fresh_run_never_overwrites_an_earlier_one(tmp_path, capsys, monkeypatch):
    from adderquant.cli import main

    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n')
    model, ds = _net(), _data()
    q = quantize(model, _calib(ds), QuantConfig.ours_fast(4)).model
    with pytest.raises(FileExistsError, match="--qat-resume"):
        qat(q, ds, NORM, QATConfig(epochs=1, log_path=str(log)), float_model=model)
    monkeypatch.setattr("adderquant.cli._data", lambda args: pytest.fail("data was loaded before the check"))
    assert main(["quantize", "--checkpoint", str(tmp_path / "never-read.pth"), "--qat-epochs", "1",
                 "--qat-log", str(log)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err, err
    assert log.read_text() == '{"epoch": 1}\n'
