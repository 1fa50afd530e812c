"""dalishare.augment: shapes, input untouched, determinism, statistics, the two ways of running
(sample by sample on the CPU, whole-batch ops as on a GPU), agreement with torchvision's functional
ops (where torchvision is installed), CUDA (marked gpu), and use from DaliShareIterator."""

from __future__ import annotations

import pytest
import torch

from dalishare.augment import (
    ColorJitter,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToDtype,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def nhwc(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 NHWC images with structure (gradients plus noise), as the ring holds them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size).view(1, 1, size, 1)
    return (ramp + torch.randint(0, 55, (n, size, size, 3), generator=g)).to(torch.uint8)


def recipe(seed=0, **kw) -> Compose:
    return Compose([RandomResizedCrop(24), RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4, 0.1),
                    ToDtype(torch.float32, scale=True), Normalize(MEAN, STD)], seed=seed, **kw)


@pytest.mark.parametrize("sample_by_sample", [True, False], ids=["cpu-way", "gpu-way"])
def test_a_batch_dict_becomes_float_nchw_and_the_input_is_untouched(sample_by_sample):
    images = nhwc()
    before = images.clone()
    batch = {"images": images, "labels": torch.arange(6), "indices": torch.arange(6) + 10}
    out = recipe(sample_by_sample=sample_by_sample)(batch)
    assert out["images"].shape == (6, 3, 24, 24) and out["images"].dtype == torch.float32
    assert out["labels"] is batch["labels"] and out["indices"] is batch["indices"]
    assert torch.equal(images, before)
    as_float = Compose([ToDtype(torch.float32, scale=True)])(batch)["images"]
    assert as_float.shape == (6, 3, 32, 32) and torch.allclose(as_float, images.permute(0, 3, 1, 2).float() / 255)


def test_tensors_are_taken_as_nchw_and_nhwc_looking_ones_are_refused():
    images = nhwc().permute(0, 3, 1, 2)
    assert RandomHorizontalFlip(p=1.0)(images).shape == (6, 3, 32, 32)
    with pytest.raises(ValueError, match="looks N,H,W,C"):
        RandomHorizontalFlip()(nhwc())
    with pytest.raises(TypeError, match="Normalize needs float images"):
        Normalize(MEAN, STD)(images)
    with pytest.raises(ValueError, match="antialias"):
        RandomResizedCrop(24, antialias=True)


def test_the_same_seed_gives_the_same_output_and_different_seeds_differ():
    batch = {"images": nhwc()}
    for sample_by_sample in (True, False):
        first = recipe(seed=7, sample_by_sample=sample_by_sample)(batch)["images"]
        assert torch.equal(first, recipe(seed=7, sample_by_sample=sample_by_sample)(batch)["images"])
        assert not torch.equal(first, recipe(seed=8, sample_by_sample=sample_by_sample)(batch)["images"])
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(recipe(seed=7)(batch)["images"],
                       Compose(recipe().transforms, generator=gen)(batch)["images"])


def test_parameters_are_drawn_per_sample():
    same = nhwc(1).expand(16, -1, -1, -1)  # sixteen copies of one image
    out = recipe(seed=3)({"images": same})["images"]
    assert len({tuple(x.flatten()[:64].tolist()) for x in out}) == 16


@pytest.mark.parametrize("images", [nhwc(), nhwc().float() / 255], ids=["uint8", "float"])
def test_sample_by_sample_and_whole_batch_ops_agree(images):
    """The CPU way and the GPU way (run here on the CPU) draw the same parameters and compute the
    same images, up to the rounding of bilinear resizing."""
    batch = {"images": images}
    a = recipe(seed=5, sample_by_sample=True)(batch)["images"]
    b = recipe(seed=5, sample_by_sample=False)(batch)["images"]
    assert a.shape == b.shape
    assert (a - b).abs().max() < 0.08  # in normalized units: a few uint8 levels at most
    assert (a - b).abs().mean() < 0.005


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sample_by_sample", [True, False], ids=["cpu-way", "gpu-way"])
def test_other_float_dtypes_keep_their_dtype(dtype, sample_by_sample):
    images = (nhwc().permute(0, 3, 1, 2).float() / 255).to(dtype)
    out = Compose([RandomResizedCrop(24), RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4, 0.1),
                   Normalize(MEAN, STD)], seed=0, sample_by_sample=sample_by_sample)(images)
    assert out.dtype == dtype and out.shape == (6, 3, 24, 24) and torch.isfinite(out.float()).all()
    reference = recipe(seed=0, sample_by_sample=sample_by_sample)(images.float())
    assert (out.float() - reference).abs().mean() < 0.05  # the same draws, up to the dtype's precision


def test_a_foreign_callable_that_resizes_is_followed_with_the_right_sizes():
    images = nhwc(4, size=64).permute(0, 3, 1, 2)
    shrink = lambda x: x[:, :, 20:36, 24:40]  # noqa: E731 (a 16x16 centre, as a torchvision crop would do)
    rrc = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole (square) image
    out = Compose([shrink, rrc], seed=0)(images)
    assert torch.equal(out, shrink(images))


def test_a_transforms_own_generator_is_used_inside_compose():
    images = nhwc(32, size=8).permute(0, 3, 1, 2)
    flips = [Compose([RandomHorizontalFlip(generator=torch.Generator().manual_seed(4))], seed=s)(images)
             for s in (1, 2)]
    assert torch.equal(flips[0], flips[1])  # the flip's generator decides, not the Compose's seed


def test_flip_rate_is_near_p():
    images = nhwc(2000, size=4).permute(0, 3, 1, 2)
    for p in (0.1, 0.5, 0.9):
        out = RandomHorizontalFlip(p, generator=torch.Generator().manual_seed(1))(images)
        flipped = (out == images.flip(-1)).flatten(1).all(1) & ~(out == images).flatten(1).all(1)
        assert abs(flipped.float().mean().item() - p) < 0.04, p


def test_crop_areas_and_ratios_stay_inside_their_ranges():
    rrc = RandomResizedCrop(24, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    top, left, h, w = rrc.make_params(4000, 64, 80, torch.Generator().manual_seed(2))["box"].unbind(1)
    area = h * w / (64 * 80)
    assert area.min() >= 0.2 - 0.02 and area.max() <= 0.6 + 0.02  # rounding h and w to pixels
    assert (w / h).min() >= 0.5 * 0.95 and (w / h).max() <= 2.0 * 1.05
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 80).all()
    assert area.std() > 0.05 and top.std() > 1 and left.std() > 1  # spread, not constant


def test_jitter_factors_and_effects_stay_within_bounds():
    cj = ColorJitter(brightness=0.3, contrast=(0.5, 0.9), saturation=0.2, hue=0.1)
    params = cj.make_params(4000, 8, 8, torch.Generator().manual_seed(3))
    b, c, s, h = params["factors"].unbind(1)
    assert 0.7 <= b.min() and b.max() <= 1.3 and 0.5 <= c.min() and c.max() <= 0.9
    assert 0.8 <= s.min() and s.max() <= 1.2 and -0.1 <= h.min() and h.max() <= 0.1
    assert sorted(params["order"][0].tolist()) == [0, 1, 2, 3]
    assert len({tuple(o) for o in params["order"].tolist()}) == 24  # every order of the four occurs
    gray = torch.full((500, 3, 4, 4), 0.5)  # brightness alone scales a gray image by its factor
    out = ColorJitter(brightness=0.3, generator=torch.Generator().manual_seed(4))(gray)
    ratio = out[:, 0, 0, 0] / 0.5
    assert 0.7 - 1e-6 <= ratio.min() and ratio.max() <= 1.3 + 1e-6 and ratio.std() > 0.1


# -- agreement with torchvision's functional ops, for fixed parameters -------------------------------

def _tv():
    return pytest.importorskip("torchvision.transforms.v2.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("box", [(3, 5, 20, 17), (0, 0, 32, 32), (10, 2, 9, 30)])
def test_resized_crop_agrees_with_torchvision(dtype, box):
    TF = _tv()
    images = nhwc(3).permute(0, 3, 1, 2)
    images = images.float() / 255 if dtype == torch.float32 else images
    rrc = RandomResizedCrop((24, 28))
    params = {"box": torch.tensor([box] * 3, dtype=torch.float32)}
    expected = torch.stack([TF.resized_crop(img, *box, size=[24, 28], antialias=False) for img in images])
    tolerance = 1e-4 if dtype == torch.float32 else 1
    for out in (rrc.apply(images, params), torch.cat([rrc.apply_one(img[None], {"box": box}) for img in images])):
        assert out.dtype == dtype and out.shape == expected.shape
        assert (out.float() - expected.float()).abs().max() <= tolerance


def test_flip_normalize_and_to_dtype_agree_with_torchvision():
    TF = _tv()
    images = nhwc(3).permute(0, 3, 1, 2)
    flip = RandomHorizontalFlip().apply(images, {"flip": torch.tensor([True, False, True])})
    assert torch.equal(flip, torch.stack([TF.horizontal_flip(images[0]), images[1], TF.horizontal_flip(images[2])]))
    as_float = ToDtype(torch.float32, scale=True)(images)
    assert torch.equal(as_float, TF.to_dtype(images, torch.float32, scale=True))
    assert torch.equal(ToDtype(torch.uint8, scale=True)(as_float), TF.to_dtype(as_float, torch.uint8, scale=True))
    assert torch.allclose(Normalize(MEAN, STD)(as_float), TF.normalize(as_float, MEAN, STD), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_each_colour_adjustment_agrees_with_torchvision(dtype):
    TF = _tv()
    images = nhwc(2).permute(0, 3, 1, 2)
    images = images.float() / 255 if dtype == torch.float32 else images
    adjust = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    cj = ColorJitter(0.5, 0.5, 0.5, 0.2)
    for k, factor in [(0, 1.3), (0, 0.6), (1, 1.4), (1, 0.5), (2, 1.5), (2, 0.2), (3, 0.15), (3, -0.2)]:
        order = torch.tensor([[k, *[j for j in range(4) if j != k]]] * 2)
        factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
        factors[:, k] = factor
        # only the first adjustment changes anything: the others get their identity factors
        ours = cj.apply(images, {"order": order, "factors": factors})
        theirs = torch.stack([adjust[k](img, factor) for img in images])
        tolerance = 2e-5 if dtype == torch.float32 else 2  # uint8: ours rounds once, torchvision floors and truncates
        assert (ours.float() - theirs.float()).abs().max() <= tolerance, (k, factor)


def test_colour_jitter_applies_each_samples_own_order_like_torchvision_would():
    TF = _tv()
    images = nhwc(3).permute(0, 3, 1, 2).float() / 255
    orders = [[3, 0, 2, 1], [1, 2, 3, 0], [0, 1, 2, 3]]
    factors = torch.tensor([[1.2, 0.7, 1.3, 0.1], [0.8, 1.4, 0.6, -0.05], [1.1, 1.1, 1.1, 0.2]])
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for img, order, f in zip(images, orders, factors):
        for k in order:
            img = fns[k](img, float(f[k]))
        expected.append(img)
    cj = ColorJitter(0.5, 0.5, 0.5, 0.2)
    params = {"order": torch.tensor(orders), "factors": factors}
    assert torch.allclose(cj.apply(images, params), torch.stack(expected), atol=1e-5)
    one = [cj.apply_one(img[None], {"order": o, "factors": f.tolist()}) for img, o, f in zip(images, orders, factors)]
    assert torch.allclose(torch.cat(one), torch.stack(expected), atol=1e-5)


def test_torchvision_transforms_mix_into_compose():
    v2 = pytest.importorskip("torchvision.transforms.v2")
    out = Compose([ToDtype(torch.float32, scale=True), v2.CenterCrop(20), RandomHorizontalFlip()], seed=1)(
        {"images": nhwc()})["images"]
    assert out.shape == (6, 3, 20, 20)


# -- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_it_is_batched_reproducible_and_agrees_with_the_cpu():
    images = nhwc(64, size=64)
    cuda = {"images": images.cuda()}
    recipe(seed=9)(cuda)  # warm-up: per-device constants are made (and copied) once
    torch.cuda.set_sync_debug_mode("error")  # a batch must not make the CPU wait for the GPU
    try:
        first = recipe(seed=9)(cuda)["images"]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.device.type == "cuda" and first.shape == (64, 3, 24, 24)
    assert torch.equal(first, recipe(seed=9)(cuda)["images"])
    cpu = recipe(seed=9, sample_by_sample=False)({"images": images})["images"]
    assert (first.cpu() - cpu).abs().max() < 0.05
    assert torch.equal(cuda["images"].cpu(), images)


# -- from DaliShareIterator ----------------------------------------------------------------------

def test_jobs_with_different_seeds_augment_the_same_shared_batch_differently(dataset):
    from helpers import Server

    from dalishare import DaliShareIterator

    def pass_of(loader):
        return {int(i): img for b in loader for i, img in zip(b["indices"], b["images"])}

    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--min-consumers", "3"):
        loaders = [DaliShareIterator("t", batch_size=8, augment=recipe(seed=s), attach_timeout=60) for s in (1, 1, 2)]
        try:
            # read the three in lock step: each yields a batch per step, as three jobs would
            iters = [iter(loader) for loader in loaders]
            got = [{}, {}, {}]
            for batches in zip(*iters):
                for seen, b in zip(got, batches):
                    assert b["images"].shape[1:] == (3, 24, 24) and b["images"].dtype == torch.float32
                    seen.update({int(i): img.clone() for i, img in zip(b["indices"], b["images"])})
        finally:
            for loader in loaders:
                loader.close()
    assert sorted(got[0]) == sorted(got[2]) and len(got[0]) == 30
    assert all(torch.equal(got[0][i], got[1][i]) for i in got[0])  # same seed: same augmentation
    assert sum(not torch.allclose(got[0][i], got[2][i]) for i in got[0]) >= 28  # other seed: different


def test_a_torchvision_pipeline_on_the_batch_works_as_augment(dataset):
    v2 = pytest.importorskip("torchvision.transforms.v2")
    from helpers import Server

    from dalishare import DaliShareIterator

    tv = v2.Compose([v2.CenterCrop(200), v2.ToDtype(torch.float32, scale=True)])
    with Server(dataset, "--batch-size", "8", "--epochs", "1"):
        with DaliShareIterator("t", batch_size=8, attach_timeout=60,
                               augment=lambda b: {**b, "images": tv(b["images"].permute(0, 3, 1, 2))}) as loader:
            shapes = [tuple(b["images"].shape[1:]) for b in loader]
    assert shapes and set(shapes) == {(3, 200, 200)}
    assert len(shapes) == 4
