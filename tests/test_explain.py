from __future__ import annotations

import torch

from pixelvote.explain.analyze import analyze, mc_statistics, member_cams, run_member
from pixelvote.explain.hooks import ActivationCapture
from pixelvote.explain.xgradcam import gradcam, xgradcam
from pixelvote.models.member import mc_dropout


def _direct_xgradcam(member, x, target, layer, against=None):
    """The formula computed the plain way: full backward, hook on the layer, no shortcuts. With ``against``
    the score is the target's logit minus that class's (where the target is another class)."""
    store = {}
    module = dict(member.backbone.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    xx = x.clone().requires_grad_(True)
    logits = member(xx)
    h.remove()
    A = store["A"]
    score = logits[torch.arange(len(target)), target]
    if against is not None:
        score = score - logits[:, against] * (target != against)
    g = torch.autograd.grad(score.sum(), A)[0]
    A, g = A.detach().double(), g.double()
    den = A.sum((2, 3))
    w = torch.where(den > 0, (A * g).sum((2, 3)) / den.clamp_min(1e-300), torch.zeros_like(den))
    return torch.relu((w[:, :, None, None] * A).sum(1))


def test_xgradcam_matches_its_formula_on_an_inner_layer(tiny_member):
    m = tiny_member("tiny_cnn_a", cam_layer="layer2")
    x = torch.rand(3, 3, 32, 32)
    target = torch.tensor([0, 1, 0])
    out = run_member(m, x, T=1)
    cam, _ = member_cams(m, out, target)
    ref = _direct_xgradcam(m, x, target, "layer2")
    assert cam.shape == (3, 8, 8)
    assert torch.allclose(cam.double(), ref, rtol=1e-4, atol=1e-6)
    assert ref.abs().sum() > 0


def test_contrast_maps_explain_the_margin_over_the_background(tiny_member):
    x = torch.rand(3, 3, 32, 32)
    target = torch.tensor([1, 2, 0])  # the last image's target is the background class itself
    for layer in ("layer2", "layer3"):  # the gradient path and the closed form at the pooled layer
        m = tiny_member("tiny_cnn_a", k=3, cam_layer=layer, dropout=0.5)
        cam, std = member_cams(m, run_member(m, x, T=6, seeds=[1, 2, 3]), target, against=0)
        ref = _direct_xgradcam(m, x, target, layer, against=0)
        assert torch.allclose(cam.double(), ref, rtol=1e-4, atol=1e-6)
        plain, plain_std = member_cams(m, run_member(m, x, T=6, seeds=[1, 2, 3]), target)
        assert torch.allclose(cam[2], plain[2]) and torch.allclose(std[2], plain_std[2])
        assert not torch.allclose(cam[:2], plain[:2])
    # at the pooled layer each MC sample's map is the masked margin's CAM: the spread in closed form
    out = run_member(m, x, T=6, seeds=[1, 2, 3])
    W = m.fc.weight.detach()
    v = out.masks * (W[target] - W[0] * (target != 0).float().unsqueeze(1)).unsqueeze(0)
    A = out.activation.detach()
    samples = torch.relu(torch.einsum("tbc,bchw->tbhw", v, A)) / (A.shape[-1] * A.shape[-2])
    assert torch.allclose(member_cams(m, out, target, against=0)[1], samples.std(0, unbiased=False),
                          atol=1e-6)


def test_analyze_contrast_recipe_changes_only_the_maps(tiny_ensemble):
    from pixelvote.explain.analyze import MapConfig

    imgs = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    a = analyze(tiny_ensemble, imgs, mc_samples=4, seeds=[5, 6])
    c = analyze(tiny_ensemble, imgs, mc_samples=4, seeds=[5, 6], maps=MapConfig(contrast=True))
    assert torch.equal(a.label, c.label) and torch.equal(a.probs, c.probs)
    assert not torch.allclose(a.maps, c.maps)
    assert float(c.maps.amax()) <= 1.0


def test_xgradcam_equals_gradcam_at_the_pooled_layer_but_not_before(tiny_member):
    for layer, same in (("layer3", True), ("layer1", False)):
        m = tiny_member("tiny_cnn_a", cam_layer=layer)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad(), ActivationCapture(m.backbone, layer) as cap:
            logits = m(x)
        a, b = xgradcam(cap.activation, logits[:, 0]), gradcam(cap.activation, logits[:, 0])
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6) == same


def test_no_parameter_gradients_and_modes_untouched(tiny_ensemble):
    m = tiny_ensemble.members[0]
    m.train()
    flags = [mod.training for mod in m.modules()]
    analyze(tiny_ensemble, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), mc_samples=4)
    assert [mod.training for mod in m.modules()] == flags
    assert all(p.grad is None for mm in tiny_ensemble.members for p in mm.parameters())
    assert torch.is_grad_enabled()


def test_shared_backbone_mc_equals_t_full_forward_passes(tiny_member):
    m = tiny_member("tiny_cnn_b", k=3, dropout=0.5)
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(123)
    shared = run_member(m, x, T=7).probs
    torch.manual_seed(123)
    with torch.no_grad(), mc_dropout(m):
        full = torch.stack([torch.softmax(m(x), -1) for _ in range(7)])
    assert not m.training and not m.dropout.training
    assert torch.allclose(shared, full, atol=1e-6)
    assert full.std(0).max() > 1e-3  # the samples really differ


def test_mc_dropout_switches_on_only_dropout(tiny_member):
    m = tiny_member()
    with mc_dropout(m):
        assert m.dropout.training
        assert not any(mod.training for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert not any(mod.training for mod in m.modules())


def test_closed_form_sample_cams_equal_the_batched_vjp(tiny_member):
    m = tiny_member("tiny_cnn_a", dropout=0.4)
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([1, 0])
    torch.manual_seed(5)
    out = run_member(m, x, T=6)
    cam_fast, std_fast = member_cams(m, out, target)
    torch.manual_seed(5)
    out = run_member(m, x, T=6)
    m.final_cam_layer = False  # force the general autograd path
    cam_slow, std_slow = member_cams(m, out, target, chunk=4)
    assert torch.allclose(cam_fast, cam_slow, rtol=1e-4, atol=1e-6)
    assert torch.allclose(std_fast, std_slow, rtol=1e-4, atol=1e-6)
    assert std_fast.max() > 0


def test_per_image_seeds_make_results_independent_of_the_batch(tiny_ensemble):
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    a = analyze(tiny_ensemble, x, mc_samples=5, seeds=[11, 22, 33])
    b = analyze(tiny_ensemble, x[2:], mc_samples=5, seeds=[33])
    assert torch.allclose(a.stats[0]["mutual_information"][2:], b.stats[0]["mutual_information"], atol=1e-6)
    assert torch.allclose(a.uncertainty[:, 2:], b.uncertainty, atol=1e-5)


def test_mc_statistics_by_hand():
    # two samples, one image: p = (1, 0) and (0, 1) -> mean (0.5, 0.5)
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    s = mc_statistics(probs)
    ln2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(s["entropy"], ln2.view(1), atol=1e-4)
    assert torch.allclose(s["mutual_information"], ln2.view(1), atol=1e-4)  # all epistemic
    assert torch.allclose(s["variance"], torch.tensor([0.25]))
    same = mc_statistics(torch.tensor([[[0.8, 0.2]], [[0.8, 0.2]]]))
    assert float(same["mutual_information"]) < 1e-6 and float(same["variance"]) == 0.0


def test_analysis_maps_are_normalised(tiny_ensemble):
    a = analyze(tiny_ensemble, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), mc_samples=3)
    assert a.maps.shape == (2, 2, 64, 64) and a.uncertainty.shape == (2, 2, 64, 64)
    assert a.maps.min() >= 0 and a.maps.max() <= 1
    assert torch.allclose(a.ensemble_probs.sum(-1), torch.ones(2), atol=1e-5)


def test_given_labels_choose_the_cam_target(tiny_member):
    """With known labels: a finding the ensemble sees is explained as diagnosed (benign called malignant
    stays malignant); a finding it calls background, for its label; a background label changes nothing."""
    import torch

    from pixelvote.explain.analyze import analyze
    from pixelvote.models.ensemble import Ensemble

    classes = ["benign", "malignant", "normal"]
    ens = Ensemble([tiny_member("tiny_cnn_b", k=3, dropout=0.0)], classes, "normal", 32)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        m = ens.members[0]
        m.fc.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # everything diagnosed background
    a = analyze(ens, x, mc_samples=2, given=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert a.label.tolist() == [2] * 6
    default = analyze(ens, x, mc_samples=2).target
    assert a.target.tolist()[:2] == [0, 1] and a.target.tolist()[3:5] == [0, 1]
    assert a.target[2] == default[2] and a.target[5] == default[5]
    with torch.no_grad():
        m.fc.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # everything diagnosed malignant
    a = analyze(ens, x, mc_samples=2, given=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert a.label.tolist() == [1] * 6 and a.target.tolist() == [1] * 6
