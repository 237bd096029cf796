from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mscustomnet.model.pipeline import (
    Conditioning,
    CustomNetPipeline,
    MSCustomNetPipeline,
    Subject,
    app_box,
    app_canvas,
    customnet_canvas,
    ddim_sample,
    ddim_timesteps,
    initial_noise,
    layout_map,
    prepare_reference,
    to_pil,
    to_tensor,
    white_canvas,
)


def _solid(color, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def _full_mask(size=(40, 30)) -> Image.Image:
    return Image.new("L", size, 255)


# TencentARC/CustomNet@23a378f, customnet/ddim.py:134,149 (ddim_sampling(t_start=-1): timesteps[:t_start]) over
# ldm/modules/diffusionmodules/util.py:48-57 (range(0, 1000, 1000 // 50) + 1), flipped (ddim.py:152): what the
# official app's sampler.sample(S=50) evaluates the model at, written out.
OFFICIAL_TIMESTEPS_50 = [
    961, 941, 921, 901, 881, 861, 841, 821, 801, 781, 761, 741, 721, 701, 681, 661, 641, 621, 601, 581, 561, 541, 521,
    501, 481, 461, 441, 421, 401, 381, 361, 341, 321, 301, 281, 261, 241, 221, 201, 181, 161, 141, 121, 101, 81, 61,
    41, 21, 1,
]  # fmt: skip


def test_ddim_timesteps_are_the_official_customnet_ones():
    assert ddim_timesteps(50) == OFFICIAL_TIMESTEPS_50
    assert ddim_timesteps(10) == [801, 701, 601, 501, 401, 301, 201, 101, 1]  # (range(0,1000,100)+1)[:-1]
    assert ddim_timesteps(3) == [667, 334, 1]  # range(0, 1000, 333) has 4 points: 3 are evaluated
    with pytest.raises(ValueError, match="visits no timestep for steps=1"):
        ddim_timesteps(1)
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    # The full grid (how this repository sampled before), kept as an option.
    full = ddim_timesteps(50, schedule="all-steps")
    assert full[0] == 981 and full[-1] == 1 and len(full) == 50
    assert ddim_timesteps(1, schedule="all-steps") == [1]
    with pytest.raises(ValueError, match="schedule"):
        ddim_timesteps(50, schedule="karras")


def test_ddim_sample_evaluates_the_official_timesteps_from_pure_noise(tiny_ms, monkeypatch):
    seen = []

    def record(x, t, *args):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    monkeypatch.setattr(tiny_ms, "predict_noise", record)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = ddim_sample(tiny_ms, _cond(tiny_ms), noise, steps=50, guidance=1.0)
    assert seen == OFFICIAL_TIMESTEPS_50
    # With eps = 0 every DDIM step rescales by sqrt(a_prev / a_t): the noise is x_961, the end is at alphas[0].
    alphas = tiny_ms.alphas_cumprod("cpu")
    torch.testing.assert_close(out, noise * (alphas[0] / alphas[961]).sqrt())


def _cond(model, b=1):
    return Conditioning(
        layout_latents=torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        subject_tokens=torch.randn(b, 2, 32, generator=torch.Generator().manual_seed(2)),
        subject_mask=torch.ones(b, 2, dtype=torch.bool),
        text_embeds=model.encode_text(["a red ball"] * b),
    )


def test_ddim_with_an_oracle_denoiser_lands_on_the_data(tiny_ms, monkeypatch):
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    alphas = tiny_ms.alphas_cumprod("cpu")

    def oracle(x, t, *args):
        a = alphas[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    monkeypatch.setattr(tiny_ms, "predict_noise", oracle)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = ddim_sample(tiny_ms, _cond(tiny_ms), noise, steps=10, guidance=1.0)
    # CustomNet's last DDIM step goes to alphas_cumprod[0] (not 1): the result is x0 seen at t=0.
    first = ddim_timesteps(10)[0]
    assert first == 801
    eps = (noise - alphas[first].sqrt() * x0) / (1 - alphas[first]).sqrt()  # DDIM keeps the oracle's eps fixed
    expected = alphas[0].sqrt() * x0 + (1 - alphas[0]).sqrt() * eps
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_guidance_zero_is_the_unconditional_model_and_guidance_changes_the_result(tiny_ms):
    cond = _cond(tiny_ms)
    noise = initial_noise([0], (4, 8, 8))
    uncond_only = ddim_sample(tiny_ms, cond.unconditional(tiny_ms.encode_text([""])), noise, steps=3, guidance=1.0)
    zero = ddim_sample(tiny_ms, cond, noise, steps=3, guidance=0.0)
    torch.testing.assert_close(zero, uncond_only, rtol=1e-3, atol=1e-4)  # batched with cond vs alone
    cond_only = ddim_sample(tiny_ms, cond, noise, steps=3, guidance=1.0)
    guided = ddim_sample(tiny_ms, cond, noise, steps=3, guidance=3.0)
    assert not torch.allclose(guided, cond_only, atol=1e-4)
    assert not torch.allclose(cond_only, uncond_only, atol=1e-4)


def test_initial_noise_depends_on_the_seed_only():
    a = initial_noise([5, 6], (4, 8, 8))
    assert torch.equal(a[1], initial_noise([6], (4, 8, 8))[0])
    assert not torch.equal(a[0], a[1])


def test_layout_map_pastes_back_to_front_on_black():
    red = Subject(_solid((255, 0, 0)), (0.0, 0.0, 0.5, 0.5), _full_mask(), z=1)
    blue = Subject(_solid((0, 0, 255)), (0.25, 0.25, 0.75, 0.75), _full_mask(), z=0)
    arr = np.asarray(layout_map([red, blue], 32))
    assert arr.shape == (32, 32, 3)
    assert tuple(arr[12, 12]) == (255, 0, 0)  # overlap: red has the higher z
    assert tuple(arr[20, 20]) == (0, 0, 255)
    assert tuple(arr[30, 30]) == (0, 0, 0)
    swapped = np.asarray(layout_map([replace(red, z=0), replace(blue, z=1)], 32))
    assert tuple(swapped[12, 12]) == (0, 0, 255)


def test_reference_square_and_customnet_canvas():
    ref = _solid((0, 200, 0), (80, 40))
    mask = Image.new("L", (80, 40), 0)
    mask.paste(255, (10, 5, 50, 25))  # a 40 x 20 object
    square = prepare_reference(ref, mask, fit="upscale")
    arr = np.asarray(square)
    assert square.size == (256, 256)
    green = (arr[..., 1] > 150) & (arr[..., 0] < 100)
    ys, xs = np.nonzero(green)
    assert xs.max() - xs.min() + 1 == 200 and ys.max() - ys.min() + 1 == 100  # long edge 200, aspect kept
    assert tuple(arr[0, 0]) == (255, 255, 255)
    canvas = customnet_canvas(square, (0.25, 0.25, 0.75, 0.75), 64)
    assert canvas.shape == (3, 64, 64)
    green = (canvas[1] > 0.2) & (canvas[0] < -0.2)
    ys, xs = torch.nonzero(green, as_tuple=True)
    # The object (not its white margin) spans the box on its long side: 0.5 * 64 = 32 px, centred.
    assert abs(int(xs.max() - xs.min() + 1) - 32) <= 1 and abs(float(xs.float().mean()) - 31.5) <= 1
    assert torch.all(canvas[:, 0, 0] == 1.0)


def test_ms_pipeline_is_seeded_and_batch_independent(tiny_ms):
    pipe = MSCustomNetPipeline(tiny_ms)
    a = Subject(_solid((200, 10, 10)), (0.1, 0.1, 0.6, 0.5), _full_mask(), z=0, category_index=3)
    b = Subject(_solid((10, 10, 200)), (0.4, 0.4, 0.9, 0.9), _full_mask(), z=1, category_index=7)
    images = pipe(["a dog", "a cat"], [[a, b], [b]], seeds=[1, 2], steps=2)
    assert [im.size for im in images] == [(32, 32), (32, 32)] and all(im.mode == "RGB" for im in images)
    alone = pipe(["a cat"], [[b]], seeds=[2], steps=2)[0]
    assert np.array_equal(np.asarray(alone), np.asarray(images[1]))
    other_seed = pipe(["a cat"], [[b]], seeds=[3], steps=2)[0]
    assert not np.array_equal(np.asarray(other_seed), np.asarray(alone))
    with pytest.raises(ValueError, match="category_index"):
        pipe(["x"], [[Subject(a.reference, a.box, a.mask)]], seeds=[0], steps=1)
    with pytest.raises(ValueError, match="multiple of"):
        pipe(["x"], [[a]], seeds=[0], steps=1, resolution=36)


def test_customnet_pipeline_generates_with_a_viewpoint(tiny_customnet):
    pipe = CustomNetPipeline(tiny_customnet)
    s = Subject(_solid((200, 10, 10)), (0.1, 0.1, 0.6, 0.5), _full_mask())
    front = pipe(["a ball"], [s], seeds=[0], steps=2, resolution=64)[0]
    assert front.size == (64, 64)
    turned = pipe(["a ball"], [replace(s, azimuth=60.0)], seeds=[0], steps=2, resolution=64)[0]
    assert not np.array_equal(np.asarray(front), np.asarray(turned))
    with pytest.raises(ValueError, match="single-subject"):
        CustomNetPipeline(_ms_like(tiny_customnet))(["x"], [s], seeds=[0])


def _ms_like(customnet):
    from mscustomnet.model.network import CustomNetModel

    return CustomNetModel.from_customnet(customnet, category_dim=8)


def test_to_tensor_range():
    t = to_tensor(Image.new("RGB", (3, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 3)
    assert t[0].max() == 1.0 and t[1].min() == -1.0


def _object_extent(arr):
    ys, xs = np.nonzero((arr != 255).any(axis=-1))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_reference_square_is_the_official_thumbnail_never_enlarged():
    """ldm/util.py:69-86 (load_and_preprocess): white outside the mask, crop to the mask's bounding rect,
    thumbnail([200, 200], LANCZOS), add_margin (util.py:40-44) at ((256 - w) // 2, (256 - h) // 2)."""
    ref = _solid((0, 200, 0), (80, 40))
    mask = Image.new("L", (80, 40), 0)
    mask.paste(255, (10, 5, 51, 26))  # a 41 x 21 object: smaller than 200, kept at its size
    arr = np.asarray(prepare_reference(ref, mask))
    assert _object_extent(arr) == (107, 117, 148, 138)  # (256-41)//2 = 107, (256-21)//2 = 117
    assert tuple(arr[120, 120]) == (0, 200, 0)
    # A 400 x 100 object shrinks to thumbnail's 200 x 50, centred at ((256-200)//2, (256-50)//2) = (28, 103).
    big = np.asarray(prepare_reference(_solid((200, 0, 0), (400, 100)), None))
    assert _object_extent(big) == (28, 103, 228, 153)
    with pytest.raises(ValueError, match="fit"):
        prepare_reference(ref, mask, fit="stretch")


def test_app_canvas_puts_the_whole_square_into_the_integer_box():
    """main/app.py:111-119 (prepare_data): F.interpolate(square, (y1 - y0, x1 - x0), mode="bilinear") written into
    an all-ones canvas at [y0:y1, x0:x1]; the box is the app's integer slider box."""
    assert app_box((0.25, 0.25, 0.75, 0.5), 64) == (16, 16, 48, 32)
    assert app_box((0.0, 0.0, 1.0, 1.0), 256) == (0, 0, 256, 256)
    assert app_box((0.5, 0.5, 0.5, 0.5), 10) == (5, 5, 6, 6)  # never empty
    assert app_box((0.3, 0.1, 0.7, 0.9), 256) == (77, 26, 179, 230)  # 76.8, 25.6, 179.2, 230.4 to the nearest pixel
    half = np.full((256, 256, 3), 255, np.uint8)
    half[:, :128] = (0, 0, 255)  # left half blue, right half white
    square = Image.fromarray(half)
    canvas = app_canvas(square, (0.25, 0.25, 0.75, 0.5), 64)
    expected = torch.ones(3, 64, 64)
    expected[:, 16:32, 16:48] = F.interpolate(to_tensor(square)[None], size=(16, 32), mode="bilinear")[0]
    assert torch.equal(canvas, expected)
    # Aspect not kept: the 256 square fills the 32 x 16 box; blue covers its left half, columns 16..31.
    assert torch.all(canvas[2, 16:32, 16:32] == 1.0) and torch.all(canvas[0, 16:32, 16:32] == -1.0)
    assert torch.all(canvas[:, 16:32, 32:48] == 1.0) and torch.all(canvas[:, :16] == 1.0)


def test_to_pil_truncates_like_the_official_astype_uint8():
    """main/app.py:172-173: clamp((x + 1) / 2, 0, 1), times 255, astype(np.uint8): 127.9 -> 127, 254.99 -> 254."""
    values = torch.tensor([-1.5, -1.0, 2 * 127.9 / 255 - 1, 2 * 254.99 / 255 - 1, 1.0, 3.0])
    image = values.view(1, 1, 1, -1).expand(1, 3, 1, 6)
    assert np.asarray(to_pil(image)[0])[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_customnet_pipeline_conditions_on_the_official_app_inputs_by_default(tiny_customnet, monkeypatch):
    seen = []
    encode = tiny_customnet.encode_layout
    monkeypatch.setattr(tiny_customnet, "encode_layout", lambda x: (seen.append(x), encode(x))[1])
    ref, mask = _solid((200, 10, 10), (40, 30)), _full_mask((40, 30))
    s = Subject(ref, (0.1, 0.2, 0.6, 0.5), mask)
    pipe = CustomNetPipeline(tiny_customnet)
    pipe(["a ball"], [s], seeds=[0], steps=2, resolution=64)
    square = prepare_reference(ref, mask)  # thumbnail: the 40 x 30 object is not enlarged
    assert torch.equal(seen[-1][0], app_canvas(square, s.box, 64))
    pipe(["a ball"], [s], seeds=[0], steps=2, resolution=64, reference_fit="upscale", placement="dataset")
    assert torch.equal(seen[-1][0], customnet_canvas(prepare_reference(ref, mask, fit="upscale"), s.box, 64))


def test_step0_ms_customnet_is_customnets_network_but_not_its_pipeline(tiny_customnet, monkeypatch):
    """README: F_proj's zero columns make the step-0 MS-CustomNet network CustomNet's, but the pipelines condition
    differently: M_L (the reference in its box on BLACK, paper Eq. 4) vs the reference square on a WHITE canvas."""
    from mscustomnet.model.network import CustomNetModel

    ms = CustomNetModel.from_customnet(tiny_customnet, category_dim=8).eval()
    ref, mask = _solid((200, 10, 10), (40, 30)), _full_mask((40, 30))
    box = (0.25, 0.25, 0.75, 0.75)
    seen = {}
    for name, model in (("customnet", tiny_customnet), ("ms", ms)):
        encode = model.encode_layout
        monkeypatch.setattr(model, "encode_layout", lambda x, n=name, e=encode: (seen.__setitem__(n, x), e(x))[1])
    CustomNetPipeline(tiny_customnet)(["a ball"], [Subject(ref, box, mask)], seeds=[0], steps=2, resolution=64)
    MSCustomNetPipeline(ms)(["a ball"], [[Subject(ref, box, mask, category_index=32)]], seeds=[0], steps=2)
    assert torch.all(seen["customnet"][0, :, 0, 0] == 1.0) and torch.all(seen["ms"][0, :, 0, 0] == -1.0)


def test_step0_ms_customnet_with_customnets_conditioning_gives_customnets_image(tiny_customnet):
    """Issue 20 item 5: with reference_fit="thumbnail" and canvas="white", a step-0 MS-CustomNet (F_proj's zero
    category columns) is CustomNet for K = 1, image for image; its own defaults (upscale, M_L on black) are not."""
    from mscustomnet.model.network import CustomNetModel

    ms = CustomNetModel.from_customnet(tiny_customnet, category_dim=8).eval()
    ref, mask = _solid((200, 10, 10), (40, 30)), _full_mask((40, 30))
    box = (0.25, 0.25, 0.75, 0.625)
    kw = {"seeds": [3], "steps": 3, "resolution": 64}
    official = CustomNetPipeline(tiny_customnet)(["a ball"], [Subject(ref, box, mask)], **kw)[0]
    row = [[Subject(ref, box, mask, category_index=32)]]
    same = MSCustomNetPipeline(ms)(["a ball"], row, reference_fit="thumbnail", canvas="white", **kw)[0]
    assert np.array_equal(np.asarray(same), np.asarray(official))
    default = MSCustomNetPipeline(ms)(["a ball"], row, **kw)[0]
    assert not np.array_equal(np.asarray(default), np.asarray(official))


def test_white_canvas_is_the_app_canvas_for_one_subject_and_pastes_back_to_front():
    red, blue = _solid((255, 0, 0), (20, 20)), _solid((0, 0, 255), (20, 20))
    a = Subject(red, (0.0, 0.0, 0.5, 0.5), z=1)
    b = Subject(blue, (0.25, 0.25, 0.75, 0.75), z=0)
    assert torch.equal(white_canvas([red], [a], 32), app_canvas(red, a.box, 32))
    both = white_canvas([red, blue], [a, b], 32)  # a (z = 1) is in front where the boxes overlap
    assert torch.all(both[:, 8:16, 8:16] == torch.tensor([1.0, -1.0, -1.0])[:, None, None])
    assert torch.all(both[:, 20:24, 20:24] == torch.tensor([-1.0, -1.0, 1.0])[:, None, None])
    assert torch.all(both[:, 28:, 28:] == 1.0)


def test_ms_customnet_pipeline_refuses_unknown_fit_and_canvas(tiny_customnet):
    from mscustomnet.model.network import CustomNetModel

    ms = CustomNetModel.from_customnet(tiny_customnet, category_dim=8).eval()
    row = [[Subject(_solid((1, 2, 3), (8, 8)), (0.0, 0.0, 1.0, 1.0), category_index=0)]]
    with pytest.raises(ValueError, match="canvas 'grey'"):
        MSCustomNetPipeline(ms)(["x"], row, seeds=[0], steps=1, resolution=64, canvas="grey")
    with pytest.raises(ValueError, match="reference fit 'crop'"):
        MSCustomNetPipeline(ms)(["x"], row, seeds=[0], steps=1, resolution=64, reference_fit="crop")
