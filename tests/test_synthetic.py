"""The synthetic scenes: depth, pointmaps and cameras agree exactly; the writers keep them intact."""

import numpy as np
import pytest

from fourdnex.data.synthetic import render_scene, window
from fourdnex.geometry.cameras import quaternion_to_rotation, rotation_to_quaternion, unproject_depth


@pytest.fixture(scope="module")
def scene():
    return render_scene(seed=3, num_frames=9, height=32, width=48)


def test_shapes_and_types(scene):
    assert scene.rgb.shape == (9, 32, 48, 3) and scene.rgb.dtype == np.uint8
    assert scene.depth.shape == (9, 32, 48) and scene.depth.dtype == np.float32
    assert scene.points.shape == (9, 32, 48, 3) and scene.K.shape == (9, 3, 3) and scene.cam2world.shape == (9, 4, 4)
    assert scene.dynamic_mask.dtype == bool and scene.caption.endswith(".")
    assert np.isfinite(scene.depth).all() and (scene.depth > 0).all()


def test_unprojected_depth_is_the_pointmap(scene):
    points = unproject_depth(scene.depth, scene.K, scene.cam2world)
    err = np.abs(points - scene.points).max()
    assert err < 1e-4 * np.abs(scene.points).max()


def test_points_project_onto_their_pixels(scene):
    world = np.concatenate([scene.points, np.ones_like(scene.points[..., :1])], -1).astype(np.float64)
    cam = np.einsum("fij,fhwj->fhwi", np.linalg.inv(scene.cam2world.astype(np.float64)), world)[..., :3]
    np.testing.assert_allclose(cam[..., 2], scene.depth, rtol=1e-5)
    pix = np.einsum("fij,fhwj->fhwi", scene.K.astype(np.float64), cam)
    v, u = np.meshgrid(np.arange(32) + 0.5, np.arange(48) + 0.5, indexing="ij")  # pixel centres
    np.testing.assert_allclose(pix[..., 0] / pix[..., 2], np.broadcast_to(u, (9, 32, 48)), atol=1e-3)
    np.testing.assert_allclose(pix[..., 1] / pix[..., 2], np.broadcast_to(v, (9, 32, 48)), atol=1e-3)


def test_cameras_are_rigid_and_move(scene):
    rot = scene.cam2world[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    np.testing.assert_array_equal(scene.cam2world[:, 3], np.broadcast_to([0, 0, 0, 1], (9, 4)))
    assert np.linalg.norm(scene.cam2world[-1, :3, 3] - scene.cam2world[0, :3, 3]) > 1e-3
    assert (scene.points[..., 1] > -1e-4).all()  # nothing below the ground plane y = 0


def test_deterministic_and_prefix_stable(scene):
    again = render_scene(seed=3, num_frames=12, height=32, width=48)
    np.testing.assert_array_equal(again.rgb[:9], scene.rgb)
    np.testing.assert_array_equal(again.points[:9], scene.points)
    assert again.caption == scene.caption
    assert not np.array_equal(render_scene(seed=4, num_frames=9, height=32, width=48).rgb, scene.rgb)


def test_dynamic_mask_marks_the_moving_objects(scene):
    assert scene.dynamic_mask.any()
    assert (scene.labels[scene.dynamic_mask] >= 2).all()  # only object pixels move
    still = render_scene(seed=3, num_frames=9, height=32, width=48, dynamic=False)
    assert not still.dynamic_mask.any()
    # Ground pixels lie on the plane y = 0.
    ground = still.labels == 1
    assert (np.abs(still.points[..., 1][ground]) < 1e-4).all()


def test_quaternion_round_trip(scene):
    for c2w in scene.cam2world:
        rot = c2w[:3, :3].astype(np.float64)
        np.testing.assert_allclose(quaternion_to_rotation(rotation_to_quaternion(rot)), rot, atol=1e-6)


def test_window_is_a_slice_of_every_array(scene):
    part = window(scene, 2, 5)
    for name in ("rgb", "depth", "points", "K", "cam2world", "dynamic_mask", "labels"):
        np.testing.assert_array_equal(getattr(part, name), getattr(scene, name)[2:7])
    assert part.caption == scene.caption
    with pytest.raises(ValueError, match=r"frames 6\.\.10 are not all in a scene of 9 frames"):
        window(scene, 6, 5)


def test_texture_families_retexture_the_same_scenes():
    """A family left out never appears; with other families allowed, a seed keeps its geometry, cameras and motion
    (the held-out family's set is the in-distribution set, retextured) and its caption changes only in texture
    words."""
    from fourdnex.data.raycast import TEXTURE_FAMILIES
    from fourdnex.data.synthetic import _sample_scene

    training = ("checkers", "noise", "plain", "gradients")
    seen = set()
    for seed in range(40):
        draw = _sample_scene(seed, dynamic=True, families=training)
        surfaces = [draw.layout.ground, draw.layout.walls, *(o.texture for o in draw.layout.objects)]
        seen |= {t.family for t in surfaces}
        assert "striped" not in render_scene(seed, 1, 2, 2, families=training).caption
    assert seen == set(training)  # every allowed family is drawn, the held-out one never
    for seed in range(3):
        a = render_scene(seed, 5, 24, 32, families=training)
        b = render_scene(seed, 5, 24, 32, families=("stripes",))
        for name in ("depth", "points", "cam2world", "K", "dynamic_mask", "labels"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert not np.array_equal(a.rgb, b.rgb)
        assert "striped" in b.caption and set(TEXTURE_FAMILIES) > set(training)
    with pytest.raises(ValueError, match="texture families must be among"):
        render_scene(0, 1, 2, 2, families=("bricks",))


@pytest.mark.parametrize("family", ["checkers", "stripes", "noise", "plain", "gradients"])
def test_each_texture_family_mixes_its_two_colours(family):
    """A texture's colour lies between its two colours (plain is the first one); the patterns vary over a surface,
    checkers and stripes take only the two colours."""
    import torch

    from fourdnex.data.raycast import Texture

    texture = Texture(family, np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.1, 0.9]), 0.5, np.eye(3), np.zeros(3))
    points = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 4 - 2
    albedo = texture.albedo(points).numpy()
    share = (albedo[:, 2] - 0.1) / 0.8  # 0 at the first colour, 1 at the second
    assert np.allclose(albedo[:, 1], 0.1) and (share >= -1e-6).all() and (share <= 1 + 1e-6).all()
    if family == "plain":
        assert np.allclose(share, 0)
    else:
        assert share.std() > 0.1
    if family in ("checkers", "stripes"):
        assert np.all(np.isclose(share, 0, atol=1e-6) | np.isclose(share, 1, atol=1e-6))
    if family == "stripes":  # constant along the pattern's other two axes
        flat = points.clone()
        flat[:, 1:] = torch.rand(4000, 2) * 4 - 2
        assert np.array_equal(texture.albedo(flat).numpy(), albedo)


def test_pillars_are_hit_on_their_side_and_caps():
    """A cylinder's depth is exact: rays into the side and onto the top cap of a unit pillar hit where the geometry
    says."""
    import torch

    from fourdnex.data.raycast import _intersect_cylinder_local

    o = torch.tensor([[0.0, 0.0, -5.0], [0.0, 5.0, 0.5], [0.0, 3.0, -5.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    t, cap = _intersect_cylinder_local(o, d)
    assert torch.allclose(t[:2], torch.tensor([4.0, 4.0])) and cap.tolist()[:2] == [False, True]
    assert torch.isinf(t[2])  # above the pillar: missed
