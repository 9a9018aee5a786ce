"""Camera and pointmap math, batched over frames: the one home of every rotation, projection and unprojection.

Conventions, for all of fourdnex (the cache, results, registrations, exports, synthetic scenes):

* cameras are pinholes with OpenCV axes (x right, y down, z forward); ``K`` is ``(..., 3, 3)``, ``cam2world``
  ``(..., 4, 4)`` (camera-to-world);
* pixel ``(row i, column j)`` has its centre at ``(u, v) = (j + 0.5, i + 0.5)``, so the image spans
  ``[0, W] x [0, H]`` and its centre is ``(W / 2, H / 2)`` (the COLMAP and nerfstudio convention). Data that puts
  pixel centres on integers (OpenCV's convention, and the 4DNeX-10M clip files) enters and leaves through
  :func:`intrinsics_from_integer_centres` / :func:`intrinsics_to_integer_centres`;
* a camera-frame point ``Y`` projects to ``K @ Y / Y_z``; its depth is ``Y_z``;
* quaternions are ``(w, x, y, z)``; the world of synthetic scenes is y-up.

The functions are torch; those that data preparation also calls on numpy arrays accept numpy and return numpy
(computed in the arrays' own dtype).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch


def numpy_or_torch(fn: Callable) -> Callable:
    """Let a torch function take numpy arrays: when the first argument is one, every numpy argument goes in as a
    tensor (no copy) and every tensor that comes out goes back as numpy."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not isinstance(args[0], np.ndarray):
            return fn(*args, **kwargs)

        def to_torch(x):
            return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

        out = fn(*map(to_torch, args), **{k: to_torch(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(x.numpy() if isinstance(x, torch.Tensor) else x for x in out)
        return out.numpy()

    return wrapper


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Pixel centers ``(H, W, 2)`` as ``(u, v)``."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def intrinsics(fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """``(...)`` focal lengths and principal point -> ``K (..., 3, 3)`` with zero skew."""
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [torch.stack([fx, zero, cx], -1), torch.stack([zero, fy, cy], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, dim=-2)


def rigid(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``R (..., 3, 3)`` and ``t (..., 3)`` -> the 4x4 transform ``(..., 4, 4)`` mapping ``x -> R x + t``."""
    out = torch.zeros((*rotation.shape[:-2], 4, 4), dtype=rotation.dtype, device=rotation.device)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


@numpy_or_torch
def invert_rigid(transform: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``(..., 4, 4)``."""
    rotation = transform[..., :3, :3].transpose(-1, -2)
    return rigid(rotation, -(rotation @ transform[..., :3, 3:])[..., 0])


@numpy_or_torch
def transform_points(transform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(F, 4, 4)`` transforms to points ``(F, ..., 3)`` of the same frames."""
    shape = points.shape
    flat = points.reshape(shape[0], -1, 3)
    out = flat @ transform[:, :3, :3].transpose(-1, -2) + transform[:, None, :3, 3]
    return out.reshape(shape)


def camera_rays(uv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame rays with ``z = 1``: pixels ``(..., 2)`` (no frame axis) and ``K (F, 3, 3)`` -> ``(F, ..., 3)``."""
    extra = (1,) * (uv.dim() - 1)
    fx, fy = K[:, 0, 0].view(-1, *extra), K[:, 1, 1].view(-1, *extra)
    cx, cy = K[:, 0, 2].view(-1, *extra), K[:, 1, 2].view(-1, *extra)
    x = (uv[..., 0] - cx) / fx
    y = (uv[..., 1] - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


@numpy_or_torch
def unproject_depth(depth: torch.Tensor, K: torch.Tensor, cam2world: torch.Tensor) -> torch.Tensor:
    """World points ``(F, H, W, 3)`` of z-depth ``(F, H, W)`` seen by cameras ``K (F, 3, 3)``, ``cam2world (F, 4, 4)``:
    each pixel centre's ray scaled to its depth, moved into the world."""
    _, height, width = depth.shape
    rays = camera_rays(pixel_grid(height, width, depth.dtype, depth.device), K.to(depth.dtype))  # (F, H, W, 3)
    return transform_points(cam2world.to(depth.dtype), rays * depth[..., None])


@numpy_or_torch
def project_points(points: torch.Tensor, K: torch.Tensor, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels ``(F, ..., 2)`` as ``(u, v)`` and depths ``(F, ...)`` of world points ``(F, ..., 3)`` seen by cameras
    ``K (F, 3, 3)``, ``cam2world (F, 4, 4)``: ``K @ Y / Y_z`` and ``Y_z`` for the camera-frame point ``Y``. Points at
    or behind the camera (depth <= 0) get no meaningful pixel; their depth tells them apart."""
    cam = transform_points(invert_rigid(cam2world).to(points.dtype), points)
    extra = (1,) * (points.dim() - 2)
    focal = K[:, [0, 1], [0, 1]].to(points.dtype).view(-1, *extra, 2)
    centre = K[:, :2, 2].to(points.dtype).view(-1, *extra, 2)
    depth = cam[..., 2]
    return cam[..., :2] / depth[..., None] * focal + centre, depth


@numpy_or_torch
def look_at(
    eye: torch.Tensor, target: torch.Tensor, roll: torch.Tensor | float = 0.0, up: tuple[float, ...] = (0.0, 1.0, 0.0)
) -> torch.Tensor:
    """Camera-to-world ``(..., 4, 4)`` (OpenCV axes) of cameras at ``eye (..., 3)`` looking at ``target (..., 3)``,
    rolled by ``roll`` radians (``(...)`` or a number) about the viewing axis; ``up`` is the world's up."""
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.nn.functional.normalize(torch.linalg.cross(z, torch.tensor(up, dtype=eye.dtype).expand_as(z)), dim=-1)
    y = torch.linalg.cross(z, x)
    roll = torch.as_tensor(roll, dtype=eye.dtype)[..., None]
    c, s = torch.cos(roll), torch.sin(roll)
    x, y = c * x + s * y, -s * x + c * y
    return rigid(torch.stack([x, y, z], dim=-1), eye)


def intrinsics_from_integer_centres(K: np.ndarray) -> np.ndarray:
    """K ``(..., 3, 3)`` of a convention with pixel centres on integers -> this project's (centres at +0.5)."""
    out = np.array(K, dtype=np.float64, copy=True)
    out[..., :2, 2] += 0.5 * out[..., 2:, 2]
    return out


def intrinsics_to_integer_centres(K: np.ndarray) -> np.ndarray:
    """Inverse of :func:`intrinsics_from_integer_centres`."""
    out = np.array(K, dtype=np.float64, copy=True)
    out[..., :2, 2] -= 0.5 * out[..., 2:, 2]
    return out


def skew(w: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices ``(..., 3, 3)`` of vectors ``(..., 3)``: ``skew(w) @ x == cross(w, x)``."""
    zero = torch.zeros_like(w[..., 0])
    wx, wy, wz = w.unbind(-1)
    rows = [torch.stack([zero, -wz, wy], -1), torch.stack([wz, zero, -wx], -1), torch.stack([-wy, wx, zero], -1)]
    return torch.stack(rows, dim=-2)


@numpy_or_torch
def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` of axis-angle vectors ``(..., 3)`` (Rodrigues)."""
    theta = w.norm(dim=-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta < 1e-8
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1 - theta**2 / 6, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta**2 / 24, (1 - torch.cos(safe)) / safe**2)
    s = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(s)
    return eye + a * s + b * (s @ s)


def project_to_rotation(m: torch.Tensor) -> torch.Tensor:
    """The nearest rotations ``(..., 3, 3)`` (Frobenius norm) to matrices ``(..., 3, 3)``."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.det(u @ vh)
    fix = torch.ones_like(u[..., 0, :])
    fix[..., 2] = d
    return (u * fix[..., None, :]) @ vh


def rotation_angle_deg(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Angle in degrees ``(...)`` of the relative rotation between ``r1`` and ``r2`` ``(..., 3, 3)``."""
    m = r1.transpose(-1, -2) @ r2
    cos = (m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    sin = (
        torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1).norm(
            dim=-1
        )
        / 2
    )
    return torch.rad2deg(torch.atan2(sin, cos))


@numpy_or_torch
def rotation_to_quaternion(r: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` with ``w >= 0`` of rotations ``(..., 3, 3)``."""
    m = r
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    # Four candidate formulas; each is exact, the one with the largest denominator is the stable one.
    cands = torch.stack(
        [
            torch.stack(
                [1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1
            ),
            torch.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1 + 2 * m[..., 0, 0] - trace,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1 + 2 * m[..., 1, 1] - trace,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 + 2 * m[..., 2, 2] - trace,
                ],
                -1,
            ),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4)
    best = torch.stack(
        [1 + trace, 1 + 2 * m[..., 0, 0] - trace, 1 + 2 * m[..., 1, 1] - trace, 1 + 2 * m[..., 2, 2] - trace], -1
    ).argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


@numpy_or_torch
def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Rotations ``(..., 3, 3)`` of unit quaternions ``(..., 4)`` as ``(w, x, y, z)``."""
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, dim=-2)


@numpy_or_torch
def umeyama(
    src: torch.Tensor, dst: torch.Tensor, with_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The similarity (or, without ``with_scale``, the rigid motion) that best maps points ``src (N, 3)`` onto
    ``dst (N, 3)`` in least squares (Umeyama 1991): returns scale ``()``, rotation ``(3, 3)`` and translation ``(3,)``
    with ``dst ~ scale * src @ R.T + t``."""
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    a, b = src - mu_src, dst - mu_dst
    cov = b.T @ a / len(src)  # (3, 3)
    u, sing, vh = torch.linalg.svd(cov)
    fix = torch.ones(3, dtype=src.dtype, device=src.device)
    fix[2] = torch.sign(torch.det(u) * torch.det(vh))
    rotation = (u * fix) @ vh
    variance = a.square().sum(-1).mean()
    scale = (sing * fix).sum() / variance if with_scale else torch.ones((), dtype=src.dtype, device=src.device)
    return scale, rotation, mu_dst - scale * rotation @ mu_src


def _similarity_normalizer(points: torch.Tensor, target: float) -> torch.Tensor:
    """Hartley normalization ``(F, D+1, D+1)`` of points ``(F, N, D)``: centroid to 0, mean distance to ``target``."""
    dim = points.shape[-1]
    center = points.mean(dim=1)  # (F, D)
    scale = target / (points - center[:, None]).norm(dim=-1).mean(dim=1).clamp_min(1e-12)  # (F,)
    T = torch.zeros(points.shape[0], dim + 1, dim + 1, dtype=points.dtype, device=points.device)
    T[:, range(dim), range(dim)] = scale[:, None]
    T[:, :dim, dim] = -scale[:, None] * center
    T[:, dim, dim] = 1.0
    return T


def _homogeneous(x: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(..., D+1)`` with a trailing 1."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def _null_vector(rows: torch.Tensor) -> torch.Tensor:
    """The unit vector ``(F, M)`` minimizing ``|rows @ x|`` for stacked linear constraints ``rows (F, R, M)``."""
    _, vecs = torch.linalg.eigh(rows.transpose(-1, -2) @ rows)
    return vecs[..., 0]


def dlt_projection(uv: torch.Tensor, points: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized DLT: projection matrices ``P (F, 3, 4)`` with ``uv ~ P @ [X, 1]``.

    ``uv`` are pixels ``(N, 2)`` (or ``(F, N, 2)``, a set per frame), ``points`` world points ``(F, N, 3)``;
    ``weights`` ``(F, N)`` scale each point's equations (0 leaves a point out). Needs non-coplanar points.
    """
    uv = uv.expand(points.shape[0], -1, -1)
    Tu, Tx = _similarity_normalizer(uv, 2**0.5), _similarity_normalizer(points, 3**0.5)
    x = _homogeneous(points) @ Tx.transpose(-1, -2)  # (F, N, 4)
    u = _homogeneous(uv) @ Tu.transpose(-1, -2)  # (F, N, 3)
    zero = torch.zeros_like(x)
    rows = torch.cat(
        [
            torch.cat([x, zero, -u[..., :1] * x], -1),
            torch.cat([zero, x, -u[..., 1:2] * x], -1),
        ],
        dim=1,
    )  # (F, 2N, 12)
    if weights is not None:
        rows = rows * weights.repeat(1, 2)[..., None]
    p = _null_vector(rows).reshape(-1, 3, 4)
    return torch.linalg.solve(Tu, p) @ Tx


def rq3(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RQ decomposition of ``(..., 3, 3)``: ``m = r @ q`` with ``r`` upper triangular and ``q`` orthogonal."""
    flip = torch.eye(3, dtype=m.dtype, device=m.device).flip(0)
    q, r = torch.linalg.qr((flip @ m).transpose(-1, -2))
    return flip @ r.transpose(-1, -2) @ flip, flip @ q.transpose(-1, -2)


def decompose_projection(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P (F, 3, 4)`` -> ``K (F, 3, 3)`` (positive diagonal, ``K[2, 2] = 1``), world-to-camera ``R (F, 3, 3)``,
    ``t (F, 3)``.

    The overall sign of ``P`` is chosen so that ``R`` is a rotation (a mirrored pointmap has points behind).
    """
    P = P * torch.sign(torch.det(P[:, :, :3]))[:, None, None]
    k, r = rq3(P[:, :, :3])
    fix = torch.sign(k.diagonal(dim1=-2, dim2=-1))  # k @ diag(s) @ diag(s) @ r keeps the product
    k, r = k * fix[:, None, :], r * fix[:, :, None]
    t = torch.linalg.solve(k, P[:, :, 3:])[..., 0]
    return k / k[:, 2:3, 2:3], r, t


def plane_fit(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal axes of points ``(F, N, 3)``: centroid ``(F, 3)``, axes ``(F, 3, 3)`` (rows, largest spread first)
    and the spreads ``(F, 3)`` (standard deviations along the axes)."""
    center = points.mean(dim=1)
    centered = points - center[:, None]
    evals, evecs = torch.linalg.eigh(centered.transpose(-1, -2) @ centered / points.shape[1])
    axes = evecs.flip(-1).transpose(-1, -2)
    axes[:, 2] = torch.linalg.cross(axes[:, 0], axes[:, 1])
    return center, axes, evals.flip(-1).clamp_min(0).sqrt()


def planarity(points: torch.Tensor) -> torch.Tensor:
    """``(F,)`` spread across the best-fit plane over the largest spread of points ``(F, N, 3)``: 0 for a plane."""
    _, _, spread = plane_fit(points)
    return spread[:, 2] / spread[:, 0].clamp_min(1e-12)


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Normalized DLT homographies ``(F, 3, 3)`` with ``dst ~ H @ [src, 1]`` for 2D points ``(F, N, 2)``."""
    Ts, Td = _similarity_normalizer(src, 2**0.5), _similarity_normalizer(dst, 2**0.5)
    s = _homogeneous(src) @ Ts.transpose(-1, -2)
    d = _homogeneous(dst) @ Td.transpose(-1, -2)
    zero = torch.zeros_like(s)
    rows = torch.cat(
        [torch.cat([s, zero, -d[..., :1] * s], -1), torch.cat([zero, s, -d[..., 1:2] * s], -1)], dim=1
    )  # (F, 2N, 9)
    h = _null_vector(rows).reshape(-1, 3, 3)
    return torch.linalg.solve(Td, h) @ Ts


def plane_pose(uv: torch.Tensor, points: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera ``R (F, 3, 3)``, ``t (F, 3)`` of cameras ``K (F, 3, 3)`` seeing coplanar points ``(F, N, 3)``
    at pixels ``(N, 2)``, from the plane-to-image homography (well posed where DLT is not)."""
    center, axes, _ = plane_fit(points)
    plane = (points - center[:, None]) @ axes[:, :2].transpose(-1, -2)  # (F, N, 2) in-plane coordinates
    rays = camera_rays(uv, K)[..., :2]  # (F, N, 2) normalized image coordinates
    H = homography(plane, rays)  # columns ~ [R e1, R e2, R c + t]
    H = H * torch.sign(H[:, 2, 2])[:, None, None]  # the plane's center lies in front of the camera
    scale = 2 / (H[:, :, 0].norm(dim=-1) + H[:, :, 1].norm(dim=-1))
    H = H * scale[:, None, None]
    r1, r2 = H[:, :, 0], H[:, :, 1]
    in_camera = torch.stack([r1, r2, torch.linalg.cross(r1, r2)], dim=-1)  # R @ axes.T, up to noise
    R = project_to_rotation(in_camera @ axes)
    t = H[:, :, 2] - (R @ center[..., None])[..., 0]
    return R, t


def focal_from_plane(uv: torch.Tensor, points: torch.Tensor, principal_point: torch.Tensor) -> torch.Tensor:
    """Focal lengths ``(F,)`` (square pixels, known principal point ``(2,)``) from coplanar points ``(F, N, 3)``.

    Uses the two constraints a plane's homography puts on the image of the absolute conic. Returns ``inf`` where the
    image is an affine view of the plane (fronto-parallel, or the camera at infinity), which fixes no focal length.
    """
    center, axes, _ = plane_fit(points)
    plane = (points - center[:, None]) @ axes[:, :2].transpose(-1, -2)
    H = homography(plane, uv.expand(points.shape[0], -1, -1) - principal_point)
    h1, h2 = H[:, :, 0], H[:, :, 1]
    a = torch.stack(
        [h1[:, 0] * h2[:, 0] + h1[:, 1] * h2[:, 1], h1[:, :2].square().sum(-1) - h2[:, :2].square().sum(-1)], -1
    )
    b = torch.stack([h1[:, 2] * h2[:, 2], h1[:, 2].square() - h2[:, 2].square()], -1)
    w = -(a * b).sum(-1) / a.square().sum(-1).clamp_min(1e-30)  # 1 / f^2, least squares over both constraints
    return torch.where(w > 0, w.clamp_min(1e-30).rsqrt(), torch.full_like(w, float("inf")))


def reprojection_error(P: torch.Tensor, uv: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Pixel distance ``(F, H, N)`` between pixels ``uv (N, 2)`` and world points ``(F, N, 3)`` projected by each of
    ``H`` projection matrices per frame ``P (F, H, 3, 4)``; infinite where a point projects to infinity."""
    p = _homogeneous(points)[:, None] @ P.transpose(-1, -2)  # (F, H, N, 3)
    error = (p[..., :2] / p[..., 2:] - uv).norm(dim=-1)
    return torch.where(error.isfinite(), error, torch.full_like(error, math.inf))
