"""The shared image and face geometry: pure functions checked against known answers."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging import codec, compose, controls, geometry, masks
from easyphoto.rpc.errors import ImageTooSmall, ImageUnreadable

# The astronaut's landmarks as MTCNN finds them (pixels of the 512x512 photo).
ASTRONAUT = np.array(
    [[202.8, 99.6], [246.2, 102.7], [223.8, 127.3], [199.5, 137.9], [244.3, 141.6]], np.float32
)
ASTRONAUT_BOX = (178.4, 58.9, 267.0, 173.0)


def test_similarity_transform_recovers_known_transform() -> None:
    angle, scale, shift = math.radians(17), 1.7, np.array([12.0, -5.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    source = ASTRONAUT
    target = source @ rotation.T + shift
    matrix = geometry.similarity_transform(source, target)
    assert np.allclose(matrix[:, :2], rotation, atol=1e-4)
    assert np.allclose(geometry.transform_points(matrix, source), target, atol=1e-3)


def test_align_face_puts_landmarks_on_the_template() -> None:
    image = np.zeros((512, 512, 3), np.uint8)
    crop, matrix = geometry.align_face(image, ASTRONAUT, size=112)
    assert crop.shape == (112, 112, 3)
    moved = geometry.transform_points(matrix, ASTRONAUT)
    assert np.abs(moved - geometry.ARCFACE_TEMPLATE_112).max() < 6  # a similarity fit of 5 real points
    _, matrix224 = geometry.align_face(image, ASTRONAUT, size=224)
    assert np.allclose(matrix224, matrix * 2, atol=1e-3)
    _, matrix128 = geometry.align_face(image, ASTRONAUT, size=128)  # insightface's swapper crop
    assert np.allclose(
        geometry.transform_points(matrix128, ASTRONAUT), moved + np.array([8.0, 0.0]), atol=1e-3
    )


def test_roll_angle_and_score() -> None:
    level = np.array([[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]], np.float32)
    assert geometry.roll_angle(level) == 0 and geometry.roll_score(level) == 1
    tilted = level.copy()
    tilted[1] = [10 * math.cos(math.radians(30)), 10 * math.sin(math.radians(30))]
    assert geometry.roll_angle(tilted) == pytest.approx(30)
    assert geometry.roll_score(tilted) == pytest.approx(60 / 90)


def test_box_grow_and_tighten() -> None:
    assert geometry.grow_box((40, 40, 60, 80), 3.0, 1000, 1000) == (20, 0, 80, 120)
    assert geometry.grow_box((0, 0, 10, 10), 3.0, 20, 20) == (0, 0, 20, 20)  # clipped
    assert geometry.tighten_box((100, 100, 200, 300), 1000, 1000) == pytest.approx((70, 130, 230, 330))


def test_fit_size_keeps_multiples() -> None:
    assert geometry.fit_size(1200, 800, 512, 64) == (768, 512)
    width, height = geometry.fit_size(333, 517, 512, 8)
    assert width == 512 and height % 8 == 0
    assert geometry.fit_size(300, 390, 512, 64, max_side=256) == (192, 256)  # the long side bounds it
    assert geometry.fit_size(1000, 1010, 512, 64, max_side=512) == (512, 512)  # never past the maximum


def test_color_transfer_moves_lab_statistics() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(40, 200, (128, 128, 3), dtype=np.uint8)
    reference = np.clip(rng.normal((150, 110, 90), 12, (128, 128, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    moved = compose.transfer_color(source, reference, mask)
    moved_lab = cv2.cvtColor(moved, cv2.COLOR_RGB2LAB).astype(np.float32)[mask > 0]
    ref_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)[mask > 0]
    assert np.abs(moved_lab.mean(0) - ref_lab.mean(0)).max() < 1.5
    assert np.abs(moved_lab.std(0) - ref_lab.std(0)).max() < 1.5
    assert np.array_equal(moved[mask == 0], source[mask == 0])


def test_paste_back_leaves_outside_untouched_and_feathers_inside() -> None:
    image = np.full((100, 120, 3), 50, np.uint8)
    crop = np.full((40, 60, 3), 250, np.uint8)
    out = compose.paste_back(image, crop, (30, 20, 90, 60), feather_px=6)
    outside = np.ones((100, 120), bool)
    outside[20:60, 30:90] = False
    assert np.array_equal(out[outside], image[outside])
    assert out[40, 60, 0] == 250  # centre fully pasted
    assert 50 <= out[20, 60, 0] < 150  # border faded toward the template
    with pytest.raises(ValueError):
        compose.paste_back(image, crop, (0, 0, 10, 10), feather_px=2)


def test_landmark_masks_cover_the_face_not_the_background() -> None:
    parts = masks.face_part_masks((512, 512), ASTRONAUT)
    for eye in ASTRONAUT[:2]:
        assert parts["eyes"][round(eye[1]), round(eye[0])] == 255
    for corner in ASTRONAUT[3:]:
        assert parts["lips"][round(corner[1]), round(corner[0])] == 255
    face_width = ASTRONAUT_BOX[2] - ASTRONAUT_BOX[0]
    mask = masks.inpaint_mask(parts, face_width)
    assert all(mask[round(y), round(x)] == 255 for x, y in ASTRONAUT)
    assert mask[:20].max() == 0 and mask[:, :100].max() == 0 and mask[400:].max() == 0
    x0, y0, x1, y1 = ASTRONAUT_BOX
    assert (mask > 0).sum() < 2.5 * (x1 - x0) * (y1 - y0)
    ring = masks.ring_mask(parts)
    nose = ASTRONAUT[2]
    assert ring[round(nose[1]), round(nose[0])] == 0  # the ring leaves the nose alone
    assert ring[round(ASTRONAUT[0][1]), round(ASTRONAUT[0][0])] == 255  # but repaints the eyes


def _rectangle_face(shape: tuple[int, int], box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    """Face parts where the skin is one rectangle and every other part is empty."""
    parts = {name: np.zeros(shape, np.uint8) for name in masks.FACE_PARTS}
    x0, y0, x1, y1 = box
    parts["skin"][y0:y1, x0:x1] = 255
    return parts


def test_inpaint_mask_closes_and_grows_by_a_square_of_a_tenth_of_the_face() -> None:
    parts = _rectangle_face((400, 400), (150, 150, 250, 210))
    parts["skin"][175:185, 195:205] = 0  # a hole the close fills
    mask = masks.inpaint_mask(parts, face_width=200.5)  # a 20 px square: 19 px more across
    ys, xs = np.nonzero(mask)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (119, 79)
    assert 8 <= 150 - xs.min() <= 11 and 8 <= xs.max() - 249 <= 11
    assert (mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == 255).all()  # square corners


def test_closing_a_mask_in_its_bounds_equals_closing_the_whole_image() -> None:
    rng = np.random.default_rng(3)
    for centre in ((40, 50), (3, 120), (195, 2), (100, 198)):  # inside, and against each border
        mask = np.zeros((200, 210), np.uint8)
        cv2.ellipse(mask, centre, (30, 18), 20, 0, 360, 255, -1)
        mask[rng.random(mask.shape) < 0.002] = 255  # specks far from the blob widen its bounds
        for grow, shrink in ((1, 2), (5, 10), (12, 24)):
            whole = cv2.erode(cv2.dilate(mask, masks.disc(grow)), masks.disc(shrink))
            assert np.array_equal(masks.close(mask, grow, shrink), whole), (centre, grow, shrink)
    square = np.zeros((100, 100), np.uint8)
    square[40:60, 30:70] = 255  # its dilation fills its bounds to their edges: they must erode
    assert np.array_equal(
        masks.close(square, 5, 10), cv2.erode(cv2.dilate(square, masks.disc(5)), masks.disc(10))
    )
    assert not masks.close(np.zeros((20, 20), np.uint8), 2, 4).any()


def test_second_pass_ring_crosses_the_face_border_at_the_reference_kernels() -> None:
    """Dilated by a 32 px square less eroded by a 16 px one at a 512 px crop (16 px out, 8 in);
    half of that at a 256 px crop; the eyes and lips whole."""
    for side, outward, inward in ((512, 16, 8), (256, 8, 4)):
        scale = side // 256
        box = (100 * scale, 80 * scale, 160 * scale, 180 * scale)
        parts = _rectangle_face((side, side), box)
        eye = (box[0] + 10 * scale, box[1] + 20 * scale)
        parts["eyes"][eye[1], eye[0]] = 255
        row = masks.ring_mask(parts)[box[1] + 50 * scale]
        band = np.nonzero(row[: (box[0] + box[2]) // 2])[0]
        assert abs(box[0] - band.min() - outward) <= 1 and abs(band.max() + 1 - box[0] - inward) <= 1
        assert masks.ring_mask(parts)[eye[1], eye[0]] == 255


def test_colour_shift_takes_the_face_box_statistics_through_a_blurred_mask() -> None:
    ys, xs = np.mgrid[0:200, 0:200]
    template = np.stack([80 + xs // 4, 90 + ys // 4, 120 + (xs + ys) // 8], axis=-1).astype(np.uint8)
    cast = template.copy()
    cast[..., 0] = np.clip(cast[..., 0].astype(int) + 40, 0, 255)  # a red cast over everything
    mask = masks.ellipse_mask(200, 200, (60, 50, 140, 150))
    box = (40, 30, 160, 170)
    shifted = compose.shift_color(cast, template, box, mask, blur=32)
    assert np.array_equal(shifted[:30], cast[:30]) and np.array_equal(shifted[:, 160:], cast[:, 160:])
    centre = np.s_[90:110, 90:110]  # weight 1: the box's statistics match the template's
    assert abs(shifted[centre].astype(float).mean(axis=(0, 1)) - template[centre].mean(axis=(0, 1))).max() < 4
    across = shifted[100, 40:100, 0].astype(float) - cast[100, 40:100, 0]  # box edge to the centre
    assert abs(across[0]) < 1 and across[-1] < -25  # from no shift to all of it
    assert np.abs(np.diff(across)).max() < 6  # ... without a step: a hard mask jumps about 40
    assert np.array_equal(compose.shift_color(cast, template, (40, 30, 40, 170), mask, blur=32), cast)


def test_the_last_colour_shift_mask_leaves_the_mouth_out() -> None:
    parts = masks.face_part_masks((512, 512), ASTRONAUT)
    without_mouth = masks.only_parts(parts, ("skin", "brows", "eyes", "nose"))
    mouth = ((ASTRONAUT[3] + ASTRONAUT[4]) / 2).round().astype(int)
    assert parts["skin"][mouth[1], mouth[0]] == 255 and without_mouth[mouth[1], mouth[0]] == 0
    assert not (without_mouth & parts["lips"]).any()
    nose = ASTRONAUT[2].round().astype(int)
    assert without_mouth[nose[1], nose[0]] == 255
    assert np.array_equal(masks.only_parts(parts, masks.FACE_PARTS), masks.union(list(parts.values())))


def test_a_face_carried_into_a_resized_crop_lands_on_its_pixels() -> None:
    """Dots drawn at the landmarks are found, after the crop and its resize, where the carried
    landmarks say (within half a pixel), shrinking and growing."""
    image = np.zeros((300, 400), np.uint8)
    landmarks = np.array([[150.0, 120.0], [190.0, 122.0], [170.0, 150.0], [155.0, 175.0], [185.0, 176.0]])
    for x, y in landmarks:
        image[round(y) - 1 : round(y) + 2, round(x) - 1 : round(x) + 2] = 255
    face = geometry.Face((140.0, 100.0, 200.0, 190.0), 0.99, landmarks.astype(np.float32))
    box = (101, 63, 261, 231)
    for size in ((512, 538), (96, 101)):
        crop = cv2.resize(image[63:231, 101:261], size, interpolation=cv2.INTER_LINEAR).astype(float)
        carried = face.in_crop(box, size)
        radius = max(2, round(3 * size[0] / 160))
        for x, y in carried.landmarks:
            ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
            near = (np.abs(xs - x) <= radius) & (np.abs(ys - y) <= radius)
            weights = crop * near
            centre = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
            assert np.abs(centre - (x, y)).max() < 0.5
        assert carried.box[0] == pytest.approx((140 - 101) * size[0] / 160)


def test_tile_control_is_the_image_and_colour_control_nearly_so() -> None:
    """At the reference's settings (tile_resample at rate 1, colour blur ratio 1 at 6c1f895) both
    controls keep the image's detail; a 4x blur or a colour mosaic would not."""
    image = sample_photo("astronaut")
    assert np.array_equal(controls.tile_control(image), image)
    color = controls.color_control(image)
    assert color.shape == image.shape
    assert np.abs(color.astype(int) - image).mean() < 2.0
    mosaic = controls.color_control(image, blur_ratio=64)  # the reference's mechanism, 16 cells
    assert np.abs(mosaic.astype(int) - image).mean() > 8.0
    assert len(np.unique(mosaic[300, :, 0])) < 40


def test_pose_drawing_marks_landmarks_and_body() -> None:
    pose = controls.draw_pose((512, 512), [controls.Pose.from_landmarks(ASTRONAUT)])
    for x, y in ASTRONAUT:
        assert pose[round(y), round(x)].max() == 255
    chin = round(ASTRONAUT[3:, 1].max()) + 20
    assert pose[chin:].any()  # neck and shoulders below the face
    assert not pose[:40].any()


def test_pose_limbs_take_openposes_colours_and_unseen_points_draw_nothing() -> None:
    """The ControlNet reads a limb's identity from its colour: neck to nose is OpenPose's 13th
    limb (blue), neck to right shoulder its first (red)."""
    body = np.full((18, 2), np.nan, np.float32)
    body[0], body[1], body[2] = (200, 100), (200, 300), (60, 300)
    hand = np.full((21, 2), np.nan, np.float32)
    hand[0], hand[1] = (400, 400), (400, 480)  # the wrist and the thumb's first joint
    canvas = controls.draw_pose((512, 512), [controls.Pose(body, (hand,))])
    assert tuple(canvas[200, 200]) == controls.POSE_COLORS[12]
    assert tuple(canvas[300, 130]) == controls.POSE_COLORS[0]
    assert tuple(canvas[440, 400]) == (255, 0, 0)  # the hand's first edge: hue 0
    assert tuple(canvas[400, 400]) == (0, 0, 255)  # its joints are blue
    assert not canvas[:, 420:].any() and not canvas[:60].any()  # nothing for the unseen points


def test_an_aligned_paste_puts_the_sources_landmarks_on_the_targets() -> None:
    source = np.zeros((200, 300, 3), np.uint8)
    source[..., 0] = np.arange(300, dtype=np.uint8)[None, :] // 2  # red encodes the column
    source[..., 1] = np.arange(200, dtype=np.uint8)[:, None]  # green the row
    target = np.full((400, 400, 3), 7, np.uint8)
    shift, scale = np.array([150.0, 120.0]), 1.5
    landmarks = ASTRONAUT * 0.3 + np.array([60, 40])
    pasted = compose.paste_aligned(source, (50, 30, 150, 110), landmarks, target, landmarks * scale + shift)
    x, y = 80, 60  # a source pixel inside the box lands at scale * (x, y) + shift
    tx, ty = np.round(np.array([x, y]) * scale + shift).astype(int)
    assert abs(int(pasted[ty, tx, 0]) - x // 2) <= 1 and abs(int(pasted[ty, tx, 1]) - y) <= 1
    landed = np.any(pasted != 7, axis=-1)
    ys, xs = np.nonzero(landed)
    assert abs(xs.min() - (50 * scale + shift[0])) <= 1 and abs(xs.max() - (150 * scale + shift[0])) <= 2
    assert abs(ys.min() - (30 * scale + shift[1])) <= 1 and abs(ys.max() - (110 * scale + shift[1])) <= 2


def test_skin_smoothing_removes_speckle_and_keeps_edges() -> None:
    # A face-sized patch: two flat tones meeting at a sharp edge, with speckle over both.
    rng = np.random.default_rng(0)
    flat = np.zeros((200, 200, 3), np.float32)
    flat[:, :100], flat[:, 100:] = (200, 160, 140), (120, 80, 60)
    speckled = np.clip(flat + rng.normal(0, 6, flat.shape), 0, 255).astype(np.uint8)
    smooth = compose.smooth_skin(speckled, face_width=200).astype(np.float32)
    inside = (slice(20, 180), slice(10, 90))
    assert (smooth[inside] - flat[inside]).std() < 0.6 * (speckled[inside] - flat[inside]).std()
    # The edge stays sharp: two pixels either side still differ by nearly the full step (80).
    step = smooth[:, 102].mean(axis=0) - smooth[:, 97].mean(axis=0)
    assert np.all(np.abs(step + 80) < 8), step
    assert abs(float(smooth.mean()) - float(speckled.mean())) < 1  # no tone shift


def test_paint_boxes_white() -> None:
    image = np.zeros((50, 50, 3), np.uint8)
    out = compose.paint_boxes_white(image, [(10, 10, 20, 30)])
    assert out[15, 15].tolist() == [255, 255, 255] and out[5, 5].tolist() == [0, 0, 0]
    assert image.max() == 0


def test_model_tensors_are_the_plain_formula_and_round_trip() -> None:
    import torch

    image = np.random.default_rng(4).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    plain = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    tensor = codec.to_model(image)
    assert tensor.is_contiguous() and torch.equal(tensor, plain * 2 - 1)
    assert torch.equal(codec.to_model(image[..., 0], signed=False), plain[:, :1])
    assert np.array_equal(codec.from_model(tensor), image)
    assert np.array_equal(
        codec.from_model(codec.to_model(image[..., 1], signed=False), signed=False), image[..., 1]
    )


def test_model_output_to_pixels_is_the_torch_formula_bitwise() -> None:
    """Out-of-range values, and halves that round to even, as the torch formula converts them."""
    import torch

    values = torch.randn(1, 3, 37, 29, generator=torch.Generator().manual_seed(5)) * 0.8
    values[0, 0, 0, :5] = torch.tensor([-3.0, 3.0, (2 * 0.5 / 255) - 1, (2 * 1.5 / 255) - 1, 0.0])
    for signed in (True, False):
        scaled = (values[0] / 2 + 0.5) if signed else values[0]
        expected = (scaled.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(codec.from_model(values, signed=signed), expected)
    assert codec.from_model(values[:, :1]).shape == (37, 29)


def test_decode_rejects_bad_images() -> None:
    with pytest.raises(ImageUnreadable) as junk:
        codec.decode_image(b"not an image", field="templates[0]")
    assert "0x" not in junk.value.message and "12 bytes in no format" in junk.value.message
    truncated = codec.encode_png(np.full((80, 70, 3), 7, np.uint8))[:60]
    with pytest.raises(ImageUnreadable) as cut:
        codec.decode_image(truncated)
    assert "object at" not in cut.value.message
    tiny = codec.encode_png(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ImageTooSmall):
        codec.decode_image(tiny)
    png = codec.encode_png(np.full((80, 70, 3), 7, np.uint8))
    assert codec.decode_image(png).shape == (80, 70, 3)
