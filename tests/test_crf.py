"""Dense-CRF refinement of the fused map: it snaps a coarse blob to the object's edges."""

from __future__ import annotations

import pytest
import torch
from test_consensus import LESION, _analysis

from pixelvote.consensus import ConsensusConfig, apply_consensus
from pixelvote.errors import ConfigError

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is in the test extra")

from pixelvote.refine.crf import CRFConfig, dense_crf  # noqa: E402


def _scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bright square on a dark, slightly noisy background, and a coarse CAM-like blob: a Gaussian centred
    inside the square, wider than it (a 7x7 CAM upsampled looks like this)."""
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(size, size, dtype=torch.bool)
    truth[20:44, 16:40] = True
    img = torch.full((3, size, size), 40.0) + torch.randn(3, size, size, generator=g) * 4
    img[:, truth] = 200.0
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    blob = torch.exp(-((yy - 34) ** 2 + (xx - 30) ** 2) / (2 * 14.0 ** 2))
    return img.clamp(0, 255).to(torch.uint8), blob, truth


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_crf_marginal_follows_the_object_edges() -> None:
    img, blob, truth = _scene()
    q = dense_crf(blob[None], img[None])[0]
    assert q.shape == blob.shape and float(q.min()) >= 0 and float(q.max()) <= 1
    best_plain = max(_iou(blob > t, truth) for t in (0.3, 0.4, 0.5, 0.6, 0.7))
    assert _iou(q > 0.5, truth) > 0.9 > best_plain + 0.1


def test_consensus_with_crf_refines_foreground_and_skips_background() -> None:
    img, blob, truth = _scene()
    maps = torch.stack([blob, blob.roll(2, 1)])[:, None].expand(2, 2, *blob.shape).clone()  # (M=2, B=2)
    a = _analysis(maps, [[LESION, [0.1, 0.9]]] * 2)  # image 0: lesion; image 1: normal (background)
    a.inputs = torch.stack([img, img]).float() / 255.0
    plain = apply_consensus(a, ConsensusConfig(fusion="mean", threshold=0.5), 1)
    crf = apply_consensus(a, ConsensusConfig(fusion="mean", threshold=0.5, refine="crf"), 1)
    assert _iou(crf.mask[0], truth) > _iou(plain.mask[0], truth) + 0.1
    assert not crf.mask[1].any()  # a background diagnosis has no mask, refined or not
    assert crf.thresholds.shape == (2, 2) and float(crf.thresholds[0, 0]) == 0.5


def test_a_unary_made_before_gives_the_same_result_and_must_fit() -> None:
    from pixelvote.refine.crf import crf_unary

    img, blob, _ = _scene()
    cfg = CRFConfig(size=48)
    unary = crf_unary(blob[None], 0.4, cfg)
    assert unary.shape == (1, 48, 48) and 0 < unary.min() < unary.max() < 1
    torch.testing.assert_close(dense_crf(blob[None], img[None], cfg, 0.4, unary=unary),
                               dense_crf(blob[None], img[None], cfg, 0.4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unary of shape"):
        dense_crf(blob[None], img[None], cfg, 0.4, unary=unary[:, :40])


def test_crf_without_images_is_a_clear_error() -> None:
    _, blob, _ = _scene()
    a = _analysis(blob[None, None], [[LESION]])
    with pytest.raises(ConfigError, match="analysed images"):
        apply_consensus(a, ConsensusConfig(refine="crf"), 1)


def test_annotate_with_crf_but_no_pydensecrf_says_how_to_install(monkeypatch) -> None:
    from pixelvote.engine.annotate import resolve_recipe
    from pixelvote.models.checkpoint import RunConfig
    from pixelvote.refine import crf

    cfg = RunConfig(classes=["lesion", "normal"], background="normal", image_size=32, members=[],
                    consensus=ConsensusConfig(refine="crf"))
    assert resolve_recipe(cfg, "run", None, None, None)[0].refine == "crf"
    assert resolve_recipe(cfg, "paper", None, None, None)[0].refine == "none"  # the paper's rule has no CRF
    monkeypatch.setattr(crf, "available", lambda: False)
    with pytest.raises(ConfigError, match="pydensecrf2") as exc:
        resolve_recipe(cfg, "run", None, None, None)
    assert "--no-crf" in str(exc.value)
    assert resolve_recipe(cfg, "run", {"refine": "none"}, None, None)[0].refine == "none"


def test_without_pairwise_terms_the_crf_mask_is_the_thresholded_map() -> None:
    from pixelvote.refine.crf import CRFConfig, unary_probability

    img, blob, _ = _scene(32)
    for t in (0.3, 0.6):
        p = unary_probability(blob, t, 0.8)
        assert (torch.equal(p > 0.5, blob > t) and float(p.min()) >= 0.1 - 1e-6
                and float(p.max()) <= 0.9 + 1e-6)
        cfg = CRFConfig(bilateral_compat=0.0, gaussian_compat=0.0, size=32)
        q = dense_crf(blob[None], img[None], cfg, t)[0]
        assert torch.equal(q > 0.5, blob > t)


def test_the_consensus_mask_is_where_the_crf_probability_exceeds_the_cutoff(monkeypatch) -> None:
    from pixelvote.refine import crf

    img, blob, truth = _scene()
    maps = blob[None, None].expand(2, 1, *blob.shape).clone()
    a = _analysis(maps, [[LESION]] * 2)
    a.inputs = img[None].float() / 255.0
    # one weak iteration, so that the CRF's probability is not yet 0 or 1 everywhere
    base = ConsensusConfig(fusion="mean", threshold=0.5, refine="crf",
                           crf=CRFConfig(iterations=1, bilateral_compat=3.0))
    q = dense_crf(blob[None], img[None], base.crf, threshold=0.5)[0]
    masks = {}
    for cutoff in (0.05, 0.5, 0.95):
        cfg = base.model_copy(update={"crf": base.crf.model_copy(update={"cutoff": cutoff})})
        masks[cutoff] = apply_consensus(a, cfg, 1).mask[0]
        assert torch.equal(masks[cutoff], q > cutoff)
    assert int(masks[0.05].sum()) > int(masks[0.5].sum()) > int(masks[0.95].sum()) > 0
    # a run calibrated before the cutoff existed (no "cutoff" in run.json) keeps the CRF's 0.5
    old = ConsensusConfig.model_validate({**base.model_dump(exclude={"crf"}),
                                          "crf": base.crf.model_dump(exclude={"cutoff"})})
    assert torch.equal(apply_consensus(a, old, 1).mask[0], q > 0.5)
    # one pass serves every cutoff: the cutoff is not part of what reuse() keys a result by
    passes = []
    real = crf.crf_pass.infer_steps
    monkeypatch.setattr(crf.crf_pass, "infer_steps", lambda *args: passes.append(1) or real(*args))
    with crf.reuse(steps=(1,)):
        for cutoff in (0.3, 0.5, 0.7):
            cfg = base.crf.model_copy(update={"cutoff": cutoff})
            torch.testing.assert_close(dense_crf(blob[None], img[None], cfg, threshold=0.5)[0], q,
                                       rtol=0, atol=0)
    assert len(passes) == 1
    with pytest.raises(ValueError, match="cutoff"):
        CRFConfig(cutoff=1.0)


def test_reuse_gives_the_results_of_fresh_passes_and_builds_each_crf_once(monkeypatch) -> None:
    import pydensecrf.densecrf as dcrf

    from pixelvote.refine import crf
    from pixelvote.refine.crf import CRFConfig

    img, blob, _ = _scene()
    imgs, soft = torch.stack([img, img.flip(-1)]), torch.stack([blob, blob.flip(-1)])
    strong = CRFConfig(bilateral_compat=30.0)
    calls = [(imgs, 0.4, None), (imgs, 0.4, None), (imgs, 0.5, None), (imgs.flip(0), 0.4, None),
             (imgs, 0.4, strong)]
    fresh = [dense_crf(soft, i, c, threshold=t) for i, t, c in calls]
    assert not torch.equal(fresh[0], fresh[2]) and not torch.equal(fresh[0], fresh[4])
    built, inferred = [], []
    real = dcrf.DenseCRF2D

    class Counted:
        def __init__(self, *a: int) -> None:
            built.append(a)
            self.crf = real(*a)

        def inference(self, n: int):  # type: ignore[no-untyped-def]
            inferred.append(n)
            return self.crf.inference(n)

        def startInference(self):  # type: ignore[no-untyped-def]  # noqa: N802 (pydensecrf's name)
            inferred.append("steps")
            return self.crf.startInference()

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.crf, name)

    monkeypatch.setattr(dcrf, "DenseCRF2D", Counted)
    with crf.workers(1), crf.reuse(capacity=4):  # CRFs are held in this process
        for (i, t, c), expected in zip(calls, fresh, strict=True):
            torch.testing.assert_close(dense_crf(soft, i, c, threshold=t), expected, rtol=0, atol=0)
    # built: once per image colours and settings (the flipped batch has the same two images; the stronger
    # weight is another CRF); inferred: every call but the repeated one
    assert len(built) == 2 + 2 and len(inferred) == 2 + 0 + 2 + 2 + 2
    with crf.workers(1):  # counted here, not in worker processes
        dense_crf(soft, imgs, threshold=0.4)  # outside the block nothing is kept
    assert len(built) == 6 and len(inferred) == 10



def test_reuse_builds_one_crf_for_every_iteration_count(monkeypatch) -> None:
    """Calibration tries several iteration counts on each image: the pairwise terms do not depend on them,
    so the built CRF is shared, and each count still gives what a fresh pass gives."""
    import pydensecrf.densecrf as dcrf

    from pixelvote.refine import crf
    from pixelvote.refine.crf import CRFConfig

    img, blob, _ = _scene()
    imgs, soft = torch.stack([img, img.flip(-1)]), torch.stack([blob, blob.flip(-1)])
    settings = [CRFConfig(iterations=n) for n in (2, 5, 10)]
    fresh = [dense_crf(soft, imgs, c, threshold=0.4) for c in settings]
    assert not torch.equal(fresh[0], fresh[1])
    built = []
    real = dcrf.DenseCRF2D
    monkeypatch.setattr(dcrf, "DenseCRF2D", lambda *a: built.append(a) or real(*a))
    with crf.workers(1), crf.reuse():  # CRFs are held in this process
        for c, expected in zip(settings, fresh, strict=True):
            torch.testing.assert_close(dense_crf(soft, imgs, c, threshold=0.4), expected, rtol=0, atol=0)
    assert len(built) == 2  # one per image, not one per image and count


def test_reuse_with_steps_runs_each_image_once_for_every_iteration_count(monkeypatch) -> None:
    """Within reuse(steps=...), the pass for one count runs to the largest and keeps each count's result:
    the other counts then cost nothing, and every result is what a fresh pass gives."""
    from pixelvote.refine import crf, crf_pass
    from pixelvote.refine.crf import CRFConfig

    img, blob, _ = _scene()
    imgs, soft = torch.stack([img, img.flip(-1)]), torch.stack([blob, blob.flip(-1)])
    settings = [CRFConfig(iterations=n) for n in (10, 3, 5, 7)]
    fresh = [dense_crf(soft, imgs, c, threshold=0.4) for c in settings]
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[1], fresh[2])
    runs = []
    real = crf_pass.infer_steps
    monkeypatch.setattr(crf_pass, "infer_steps", lambda d, p, counts: runs.append(sorted(counts))
                        or real(d, p, counts))
    with crf.workers(1), crf.reuse(steps=(3, 5, 10)):
        for c, expected in zip(settings, fresh, strict=True):
            torch.testing.assert_close(dense_crf(soft, imgs, c, threshold=0.4), expected, rtol=0, atol=0)
    # one run per image for 10, 3 and 5; 7 is not among the steps: a run of its own
    assert runs == [[3, 5, 10], [3, 5, 10], [7], [7]]


def test_reuse_runs_the_passes_it_lacks_in_the_workers_and_keeps_every_count(monkeypatch) -> None:
    from pixelvote.refine import crf, crf_pass
    from pixelvote.refine.crf import CRFConfig

    imgs, soft = _batch(4)
    settings = [CRFConfig(iterations=n) for n in (5, 2, 5)]
    with crf.workers(1):
        fresh = [dense_crf(soft, imgs, c, threshold=0.4) for c in settings]
    # a pass in this process now fails, and the workers are counted
    monkeypatch.setattr(crf_pass, "infer_steps", lambda *a: (_ for _ in ()).throw(AssertionError("ran here")))
    monkeypatch.setattr(crf, "_parallel_failed", False)
    calls = []
    real = crf._parallel
    monkeypatch.setattr(crf, "_parallel", lambda *a: calls.append(len(a[1])) or real(*a))
    with crf.workers(2), crf.reuse(steps=(2, 5)):
        for c, expected in zip(settings, fresh, strict=True):
            torch.testing.assert_close(dense_crf(soft, imgs, c, threshold=0.4), expected, rtol=0, atol=0)
        # a batch with one image not held: its pass would run here
        with pytest.raises(AssertionError, match="ran here"):
            dense_crf(torch.cat([soft[:2], soft[2:3].flip(-1)]), imgs[:3], settings[0], threshold=0.4)
    # the four images went to the workers once; 2 and 5 again were held
    assert calls == [4] and not crf._parallel_failed
    # short passes run here, on CRFs held in this process
    with crf.workers(2), crf.reuse(), pytest.raises(AssertionError, match="ran here"):
        dense_crf(soft, imgs, CRFConfig(iterations=crf.PARALLEL_FROM_ITERATIONS - 1), threshold=0.4)

def _batch(n: int = 5, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    img, blob, _ = _scene(size)
    g = torch.Generator().manual_seed(1)
    imgs = torch.stack([img.roll(7 * i, -1) for i in range(n)])
    scale = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    soft = torch.stack([blob.roll(5 * i, -2) for i in range(n)]) * scale
    return imgs, soft


def test_workers_give_the_passes_of_this_process_and_run_elsewhere(monkeypatch) -> None:
    from pixelvote.refine import crf, crf_pass

    imgs, soft = _batch()
    with crf.workers(1):
        here = dense_crf(soft, imgs, threshold=0.4)
    assert crf.worker_count(5) >= 1
    # a pass in this process now fails: with two workers the batch still comes back, so it ran in them
    monkeypatch.setattr(crf_pass, "infer", lambda *a: (_ for _ in ()).throw(AssertionError("ran here")))
    with crf.workers(2):
        there = dense_crf(soft, imgs, threshold=0.4)
    torch.testing.assert_close(there, here, rtol=0, atol=0)
    with crf.workers(1), pytest.raises(AssertionError, match="ran here"):
        dense_crf(soft, imgs, threshold=0.4)


def test_workers_take_batches_over_a_megabyte(monkeypatch) -> None:
    # joblib memory-maps arrays over 1 MB read-only for its workers, and pydensecrf2 refused them: such a
    # batch fell back to this process for good, with a warning
    from pixelvote.refine import crf, crf_pass

    imgs, soft = _batch(12, size=256)
    cfg = CRFConfig(size=256, iterations=2)
    assert imgs[:6].numel() > 1e6  # the colours each of two workers is sent, in bytes
    with crf.workers(1):
        here = dense_crf(soft, imgs, cfg)
    monkeypatch.setattr(crf, "_parallel_failed", False)
    monkeypatch.setattr(crf_pass, "infer", lambda *a: (_ for _ in ()).throw(AssertionError("ran here")))
    with crf.workers(2):
        there = dense_crf(soft, imgs, cfg)
    assert not crf._parallel_failed
    torch.testing.assert_close(there, here, rtol=0, atol=0)


def test_workers_that_fail_fall_back_to_this_process_with_a_warning(monkeypatch, caplog) -> None:
    import joblib

    from pixelvote.refine import crf

    imgs, soft = _batch(3)
    with crf.workers(1):
        expected = dense_crf(soft, imgs)

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("no processes here")

    monkeypatch.setattr(joblib, "Parallel", broken)
    monkeypatch.setattr(crf, "_parallel_failed", False)
    with crf.workers(2), caplog.at_level("WARNING", logger="pixelvote.refine.crf"):
        got = dense_crf(soft, imgs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "worker processes failed (OSError: no processes here)" in caplog.text
    assert crf._parallel_failed  # not tried again in this process


def test_worker_count_follows_the_block_then_the_environment_then_the_cores(monkeypatch) -> None:
    from joblib import cpu_count

    from pixelvote.refine import crf

    monkeypatch.delenv(crf.WORKERS_ENV, raising=False)
    assert crf.worker_count(64) == min(64, cpu_count()) and crf.worker_count(1) == 1
    monkeypatch.setenv(crf.WORKERS_ENV, "3")
    assert crf.worker_count(8) == 3 and crf.worker_count(2) == 2
    with crf.workers(1):
        assert crf.worker_count(8) == 1
    for bad in ("0", "two"):
        monkeypatch.setenv(crf.WORKERS_ENV, bad)
        with pytest.raises(ConfigError, match=f"must be a whole number >= 1, not '{bad}'"):
            crf.worker_count(8)
    with pytest.raises(ValueError):
        with crf.workers(0):
            pass


def test_colours_made_once_give_the_passes_of_the_images_and_must_fit() -> None:
    from pixelvote.refine import crf

    imgs, soft = _batch(3)
    big = torch.nn.functional.interpolate(soft[:, None], size=(150, 150), mode="bilinear")[:, 0]
    big_imgs = torch.nn.functional.interpolate(imgs.float(), size=(150, 150)).round().to(torch.uint8)
    cfg = crf.CRFConfig(size=100)  # the maps are resized for the CRF, and its marginal back
    colours = crf.crf_colours(big_imgs, big.shape[-2:], cfg)
    assert colours.rgb.shape == (3, 100, 100, 3) and len(set(colours.digests)) == 3
    with crf.workers(1):
        for t in (0.3, 0.5):
            expected = dense_crf(big, big_imgs, cfg, threshold=t)
            got = dense_crf(big, None, cfg, t, colours=colours)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="CRF's size"):
            dense_crf(big, None, crf.CRFConfig(size=64), 0.5, colours=colours)
        with pytest.raises(ValueError, match="images or their colours"):
            dense_crf(big, None, cfg, 0.5)


def test_soft_margins_score_every_threshold_as_apply_consensus_does(monkeypatch) -> None:
    from pixelvote.consensus import soft_margins
    from pixelvote.refine import crf

    img, blob, _ = _scene()
    # 3 members x 3 images: all see a lesion; one member calls image 1 normal; image 2 is normal to all
    maps = torch.stack([torch.stack([blob.roll(3 * m + i, 1) for i in range(3)]) for m in range(3)])
    probs = [[LESION, LESION, [0.1, 0.9]], [LESION, [0.2, 0.8], [0.1, 0.9]], [LESION, LESION, [0.1, 0.9]]]
    made = []
    real = crf.crf_colours
    monkeypatch.setattr(crf, "crf_colours", lambda *a, **k: made.append(1) or real(*a, **k))
    for given in (None, torch.tensor([0, 0, 0])):  # gated by the diagnosis, or as annotate --labels
        a = _analysis(maps, probs)
        a.inputs = torch.stack([img, img.roll(5, -1), img.roll(9, -2)]).float() / 255.0
        a.given = given
        for fusion, members in (("mean", "all"), ("mean", "agreeing"), ("intersection", "all")):
            base = ConsensusConfig(fusion=fusion, refine="crf", labelled_members=members)
            cfgs = [base.model_copy(update={"threshold": t, "crf": CRFConfig(bilateral_compat=w)})
                    for t in (0.2, 0.4, 0.6) for w in (10.0, 30.0)]
            expected = [apply_consensus(a, cfg, 1).margin for cfg in cfgs]
            made.clear()
            fused = soft_margins(a, base, 1)
            for cfg, want in zip(cfgs, expected, strict=True):
                torch.testing.assert_close(fused.margin(cfg), want, rtol=0, atol=0)
            assert len(made) == 1  # the batch's colours once, for the six
            with pytest.raises(ValueError, match="fused with"):
                fused.margin(base.model_copy(update={"fusion": "vote"}))
            assert (fused.margin(base)[2] < 0).all() == (given is None)  # normal: no mask unless labelled
