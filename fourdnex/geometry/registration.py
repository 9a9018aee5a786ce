"""Cameras and depth from a pointmap video: per-frame pinhole K, camera-to-world pose and per-pixel depth.

Every pixel ``(u, v)`` of frame ``f`` holds a 3D point ``X``; a pinhole camera ``K, R, t`` (world-to-camera) sees it
on its ray when ``Y = R X + t`` satisfies ``Y_xy = Y_z * ((u - cx) / fx, (v - cy) / fy)``. The fit:

1. closed form, per frame: a normalized DLT of the projection matrix from a subsample of pixels (the best of random
   16-point DLTs, refitted on the points it explains: :func:`robust_projection`), RQ-decomposed into K, R, t;
   frames whose points are (nearly) coplanar, where the DLT is ill-posed, get their pose from the plane-to-image
   homography under the K of the other frames (or, if every frame is planar, a K from the plane);
2. a short robust Levenberg-Marquardt refinement of all frames jointly (shared or per-frame K, all poses) on the
   residual ``r = Y_xy - Y_z * ray_xy``, with Huber weights; the K equations are corrected for the bias that noise
   in the points puts into them (errors in variables: the Jacobian holds the noisy ``Y_z``);
3. optionally, the camera path smoothed over time (:func:`smooth_cameras`, ``smooth_frames``): each frame's
   generated pointmap carries its own error, which moves its camera alone;
4. per pixel: depth ``Y_z``, the registered point (the pixel's ray at that depth, in world) and the residual
   ``|r|``, the distance between that point and the input point (a per-pixel confidence, in pointmap units).

The world frame is the pointmap's own: cameras come out in the units of the input (scale is not observable).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fourdnex import __version__
from fourdnex.errors import FourDNeXError, UsageError
from fourdnex.geometry.cameras import (
    decompose_projection,
    dlt_projection,
    focal_from_plane,
    intrinsics,
    invert_rigid,
    pixel_grid,
    planarity,
    plane_pose,
    quaternion_to_rotation,
    reprojection_error,
    rigid,
    rotation_to_quaternion,
    so3_exp,
)
from fourdnex.runtime import cpu_threads


@dataclass
class RegistrationConfig:
    """Settings of the camera/depth fit to a pointmap video; pm_registration.py's flags."""

    shared_intrinsics: bool = True  # one K for the clip; False: one K per frame
    iterations: int = 10  # Levenberg-Marquardt steps of the joint refinement (it stops earlier once converged)
    samples: int = 4096  # pixels per frame the fit uses (a jittered grid); every pixel gets a depth and a residual
    init_samples: int = 2048  # of those, pixels per frame for the closed-form initialization (at most all)
    huber: float = 2.0  # robust loss threshold, in robust standard deviations of the residual
    planar_threshold: float = 0.02  # frames whose points are this flat (spread across / along) skip the DLT
    default_focal: float = 1.2  # focal length in widths where nothing fixes it (every frame planar): the reference's
    # The camera path smoothed over time by a Gaussian of this many frames (0: each frame's own camera): a generator's
    # frame-to-frame error moves each frame's camera alone; on the demo models' held-out scenes 2 frames cut the ATE
    # by a quarter and the RPE by 30-40 % with the depth as it was, but a pointmap without error then gets cameras
    # off its curved path (BENCHMARKS.md, "The twelfth run")
    smooth_frames: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """Raise UsageError naming the first setting the fit cannot use."""
        if self.iterations < 0:
            raise UsageError(f"iterations must be >= 0, got {self.iterations}")
        if min(self.samples, self.init_samples) < 12:
            raise UsageError(f"samples and init_samples must be >= 12, got {self.samples} and {self.init_samples}")
        if self.huber <= 0:
            raise UsageError(f"huber must be positive, got {self.huber}")
        if self.smooth_frames < 0:
            raise UsageError(f"smooth_frames must be >= 0, got {self.smooth_frames}")


class RegistrationError(FourDNeXError, ValueError):
    """A pointmap no camera can be fitted to; the message says why."""


def check_pointmap(xyz: torch.Tensor | np.ndarray) -> None:
    """Raise RegistrationError unless ``xyz`` is ``(F, H, W, 3)``, finite, and every frame's points spread out."""
    shape = tuple(xyz.shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] * shape[2] < 6:
        raise RegistrationError(f"xyz must be (F, H, W, 3) with at least 6 pixels, got {shape}")
    flat = torch.as_tensor(xyz).reshape(shape[0], -1, 3)
    if not torch.isfinite(flat).all():
        raise RegistrationError("xyz holds NaN or infinite values")
    spread = (flat.amax(dim=1) - flat.amin(dim=1)).amax(dim=-1)  # (F,)
    flat_frames = (spread <= 1e-6 * spread.max().clamp_min(1e-30)).nonzero().flatten().tolist()
    if flat_frames:
        raise RegistrationError(f"frames {flat_frames} have all their points in one place: no camera fits them")


@dataclass
class Registration:
    """The fitted scene; poses in the pointmap's frame, OpenCV axes."""

    K: torch.Tensor  # (F, 3, 3)
    cam2world: torch.Tensor  # (F, 4, 4)
    depth: torch.Tensor  # (F, H, W) camera-frame z
    points: torch.Tensor  # (F, H, W, 3) each pixel's ray at its depth, in world
    residual: torch.Tensor  # (F, H, W) distance from the registered to the input point
    planar: torch.Tensor  # (F,) bool, frames posed through the plane fallback
    info: dict = field(default_factory=dict)


def sample_pixels(height: int, width: int, count: int, seed: int = 0, device=None) -> torch.Tensor:
    """About ``count`` flat pixel indices ``(N,)``: one random pixel in each cell of a regular grid."""
    step = max(1.0, math.sqrt(height * width / count))
    rows, cols = max(1, int(height / step)), max(1, int(width / step))
    g = torch.Generator().manual_seed(seed)
    i = (
        ((torch.arange(rows)[:, None] + torch.rand(rows, cols, generator=g)) * height / rows)
        .long()
        .clamp_max(height - 1)
    )
    j = ((torch.arange(cols)[None, :] + torch.rand(rows, cols, generator=g)) * width / cols).long().clamp_max(width - 1)
    return (i * width + j).flatten().to(device)


def _residuals(R: torch.Tensor, t: torch.Tensor, k: torch.Tensor, uv: torch.Tensor, X: torch.Tensor):
    """Camera points ``Y (F, N, 3)``, ray slopes ``a, b (F, N)``, residuals ``(F, N, 2)``; ``k``: fx fy cx cy."""
    Y = X @ R.transpose(-1, -2) + t[:, None]
    a = ((uv[..., 0] - k[:, 2:3]) / k[:, 0:1]).expand_as(Y[..., 0])
    b = ((uv[..., 1] - k[:, 3:4]) / k[:, 1:2]).expand_as(Y[..., 0])
    r = torch.stack([Y[..., 0] - Y[..., 2] * a, Y[..., 1] - Y[..., 2] * b], dim=-1)
    return Y, a, b, r


def _normal_equations(
    Y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    fit_k: torch.Tensor,
    noise_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton system ``H (F, 10, 10)``, ``g (F, 10)`` of the weighted residuals over (rotation, translation,
    fx, fy, cx, cy) per frame, for the update ``Y -> Y + w x Y + dt``; ``fit_k (F,)`` is False where K stays out.

    Each residual's Jacobian row is linear in ``psi = (Y, 1)`` with coefficients affine in its ray slope:
    ``d r_x = (P0 + a P1) psi`` and ``d r_y = (Q0 + b Q1) psi``, so ``H`` and ``g`` need only per-frame moments
    of ``psi`` weighted by ``w``, ``w a``, ``w a^2`` (and ``b``): no per-pixel Jacobian is formed.
    """
    frames = Y.shape[0]
    psi = torch.cat([Y, torch.ones_like(Y[..., :1])], dim=-1)  # (F, N, 4)
    outer = (psi[..., :, None] * psi[..., None, :]).flatten(-2)  # (F, N, 16)
    weights = torch.stack([w, w * a, w * a * a, w, w * b, w * b * b], dim=-1)  # (F, N, 6)
    M = (weights.transpose(1, 2) @ outer).view(frames, 6, 4, 4)
    rw = torch.stack([w * r[..., 0], w * a * r[..., 0], w * r[..., 1], w * b * r[..., 1]], dim=-1)
    v = (rw.transpose(1, 2) @ psi).view(frames, 2, 8)  # per residual axis: (sum w r psi, sum w slope r psi)
    k = k.expand(frames, 4)
    A = Y.new_zeros(frames, 2, 10, 8)  # per residual axis: [P0 | P1] and [Q0 | Q1] (rows: unknowns)
    A[:, 0, 1, 2], A[:, 0, 2, 1], A[:, 0, 3, 3] = 1, -1, 1  # P0 psi = (0, z, -y, 1, 0, 0, 0, 0, z/fx, 0)
    A[:, 0, 8, 2] = 1 / k[:, 0]
    A[:, 0, 0, 5], A[:, 0, 1, 4], A[:, 0, 5, 7] = -1, 1, -1  # P1 psi = (-y, x, 0, 0, 0, -1, z/fx, 0, 0, 0)
    A[:, 0, 6, 6] = 1 / k[:, 0]
    A[:, 1, 0, 2], A[:, 1, 2, 0], A[:, 1, 4, 3] = -1, 1, 1  # Q0 psi = (-z, 0, x, 0, 1, 0, 0, 0, 0, z/fy)
    A[:, 1, 9, 2] = 1 / k[:, 1]
    A[:, 1, 0, 5], A[:, 1, 1, 4], A[:, 1, 5, 7] = -1, 1, -1  # Q1 psi = (-y, x, 0, 0, 0, -1, 0, z/fy, 0, 0)
    A[:, 1, 7, 6] = 1 / k[:, 1]
    A[:, :, 6:] *= fit_k[:, None, None, None]
    B = torch.cat([torch.cat([M[:, 0::3], M[:, 1::3]], -1), torch.cat([M[:, 1::3], M[:, 2::3]], -1)], -2)  # (F,2,8,8)
    H = (A @ B @ A.transpose(-1, -2)).sum(1)
    g = -(A @ v[..., None]).sum(1)[..., 0]
    if noise_var is not None:  # E[J_k^T r] = -noise_var * c for isotropic point noise (J_k holds the noisy Y_z)
        ma, mb = M[:, :3, 3, 3], M[:, 3:, 3, 3]  # sum w slope^j, j = 0, 1, 2
        c = torch.stack([ma[:, 2] / k[:, 0], mb[:, 2] / k[:, 1], ma[:, 1] / k[:, 0], mb[:, 1] / k[:, 1]], -1)
        g[:, 6:] -= noise_var * c * fit_k[:, None]
    return H, g


def _huber_weights(r: torch.Tensor, k: float) -> torch.Tensor:
    """IRLS weights ``(F, N)`` of the Huber loss on residual norms, with a robust (median) scale."""
    norm = r.norm(dim=-1)
    scale = (1.4826 * norm.median()).clamp_min(1e-7)
    return (k * scale / norm.clamp_min(1e-30)).clamp_max(1.0)


def _lm_step(H: torch.Tensor, g: torch.Tensor, lam: float, refine_k: bool, shared: bool):
    """Solve the damped system of :func:`_normal_equations`; returns pose updates ``(F, 6)`` and intrinsics updates
    ``(F or 1, 4)`` (None without ``refine_k``). Frames without K rows keep their own K in the per-frame mode."""
    Hpp, gp = H[:, :6, :6], g[:, :6]

    def damp(H: torch.Tensor) -> torch.Tensor:
        return H + lam * torch.diag_embed(H.diagonal(dim1=-2, dim2=-1))

    if not refine_k:
        return torch.linalg.solve(damp(Hpp), gp), None
    Hpk, Hkk, gk = H[:, :6, 6:], H[:, 6:, 6:], g[:, 6:]
    if shared:  # eliminate the poses (Schur complement), solve the 4 shared unknowns, back-substitute
        A = torch.linalg.solve(damp(Hpp), torch.cat([Hpk, gp[..., None]], dim=-1))  # (F, 6, 5)
        S = damp(Hkk.sum(0)) - (Hpk.transpose(-1, -2) @ A[..., :4]).sum(0)
        dk = torch.linalg.solve(S, gk.sum(0) - (Hpk.transpose(-1, -2) @ A[..., 4:]).sum(0)[:, 0])
        return A[..., 4] - A[..., :4] @ dk, dk[None]
    frozen = (Hkk.diagonal(dim1=-2, dim2=-1).sum(-1) == 0).to(Hkk.dtype)  # (F,)
    Hkk = Hkk + frozen[:, None, None] * torch.eye(4, dtype=Hkk.dtype, device=Hkk.device)
    H = torch.cat([torch.cat([Hpp, Hpk], -1), torch.cat([Hpk.transpose(-1, -2), Hkk], -1)], -2)
    d = torch.linalg.solve(damp(H), torch.cat([gp, gk], -1))
    return d[:, :6], d[:, 6:]


#: The fit's revision, saved with each registration: a registration saved by another revision is not reused for
#: scoring (2: the closed-form start from random subsets, :func:`robust_projection`; 3: intrinsics kept to what a
#: camera can have, :func:`plausible_intrinsics`).
FIT_VERSION = 3
#: Focal lengths a fit may give, in image widths (a field of view from 3 to 170 degrees).
FOCAL_RANGE = (0.05, 20.0)
#: At most this ratio between the two focal lengths (square pixels give 1).
FOCAL_ASPECT = 2.0
#: The closed-form fit's random subsets per frame and points per subset (see :func:`robust_projection`).
DLT_SUBSETS, DLT_SUBSET_POINTS = 64, 16
#: About this many of the points score each subset's fit.
DLT_SCORED_POINTS = 512
#: A subset's fit is scored by its reprojection errors truncated at this share of the image width (MSAC).
DLT_TRUNCATION = 0.01
#: Points within this many robust standard deviations of the best subset's fit take part in the final DLT.
DLT_INLIER_SIGMAS = 2.5


def robust_projection(uv: torch.Tensor, X: torch.Tensor, width: int, seed: int = 0) -> torch.Tensor:
    """Projection matrices ``P (F, 3, 4)`` of pixels ``uv (N, 2)`` and points ``X (F, N, 3)``, robust to a share of
    points off their rays: per frame, the DLT of each of :data:`DLT_SUBSETS` random subsets of
    :data:`DLT_SUBSET_POINTS` points is scored by its reprojection errors on about :data:`DLT_SCORED_POINTS` points,
    each truncated at :data:`DLT_TRUNCATION` of the image ``width`` (MSAC), and the DLT of the points the best one
    explains (within :data:`DLT_INLIER_SIGMAS` robust standard deviations of its errors) is returned.

    A pointmap normalized as training normalizes it has its 2-98 percentile box clipped: 4 % of the points of each
    axis sit on the box's faces, off their pixels' rays, and a DLT of all points bends toward them (on 5 of 32
    held-out truths the focal length came out 50-99 % off, and the refinement did not recover). Subsets of 16 points
    rather than the DLT's minimal 6 (8 tried too) rarely lie on one plane of a room, where a plane-induced fit
    explains most points but has a wrong focal length.
    """
    frames, count = X.shape[:2]
    generator = torch.Generator(X.device).manual_seed(seed)
    pick = torch.randint(count, (frames * DLT_SUBSETS, DLT_SUBSET_POINTS), generator=generator, device=X.device)
    points = X.repeat_interleave(DLT_SUBSETS, dim=0).gather(1, pick[..., None].expand(-1, -1, 3))
    P = dlt_projection(uv[pick], points).reshape(frames, DLT_SUBSETS, 3, 4)
    scored = slice(None, None, max(1, count // DLT_SCORED_POINTS))  # the subsets are scored on a share of the points
    error = reprojection_error(P, uv[scored], X[:, scored])  # (F, S, n)
    best = error.clamp(max=DLT_TRUNCATION * width).square().sum(dim=2).argmin(dim=1)  # (F,)
    chosen = reprojection_error(P[torch.arange(frames, device=X.device), best, None], uv, X)[:, 0]  # (F, N)
    sigma = 1.4826 * chosen.median(dim=1, keepdim=True).values  # (F, 1)
    return dlt_projection(uv, X, (chosen <= DLT_INLIER_SIGMAS * sigma).to(X.dtype))


def plausible_intrinsics(k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(...)`` bool: whether intrinsics ``k (..., 4)`` (fx, fy, cx, cy) can be a camera's: both focal lengths within
    :data:`FOCAL_RANGE` widths and within a factor :data:`FOCAL_ASPECT` of each other, the principal point inside
    the image."""
    fx, fy, cx, cy = k.unbind(-1)
    low, high = FOCAL_RANGE[0] * width, FOCAL_RANGE[1] * width
    focal = (fx > low) & (fx < high) & (fy > low) & (fy < high) & ((fx / fy - 1).abs() <= FOCAL_ASPECT - 1)
    return focal & (cx >= 0) & (cx <= width) & (cy >= 0) & (cy <= height)


def _initialize(uv: torch.Tensor, X: torch.Tensor, size: tuple[int, int], config: RegistrationConfig):
    """Closed form: intrinsics ``(F|1, 4)``, ``R (F, 3, 3)``, ``t (F, 3)``, planar mask ``(F,)``, refine-K flag.

    Frames flat enough to be planar get their pose from the plane; the others a DLT. Where the DLT's intrinsics
    (their median over frames) are no camera's (:func:`plausible_intrinsics`), which a noisy near-planar pointmap
    gives (focal lengths of a pixel or of 1e4 widths, the principal point far outside the image), every frame is
    treated as planar: K from the plane, not refined.
    """
    height, width = size
    frames = X.shape[0]
    planar = planarity(X) < config.planar_threshold
    if (~planar).any():
        K_dlt, R_dlt, t_dlt = decompose_projection(robust_projection(uv, X[~planar], width, config.seed))
        k_dlt = torch.stack([K_dlt[:, 0, 0], K_dlt[:, 1, 1], K_dlt[:, 0, 2], K_dlt[:, 1, 2]], -1)
        k_all = k_dlt.nanmedian(dim=0).values.expand(frames, 4).clone()  # a degenerate frame may give NaN
        if not plausible_intrinsics(k_all[0], height, width):
            planar = torch.ones_like(planar)
    general = ~planar
    if not general.any():
        center = torch.tensor([width / 2, height / 2], dtype=X.dtype, device=X.device)
        focal = focal_from_plane(uv, X, center)
        focal = focal[focal.isfinite() & (focal > FOCAL_RANGE[0] * width) & (focal < FOCAL_RANGE[1] * width)]
        f = focal.median() if len(focal) else torch.tensor(config.default_focal * width, dtype=X.dtype, device=X.device)
        k_all = torch.stack([f, f, center[0], center[1]]).expand(frames, 4).clone()
    elif not config.shared_intrinsics:  # each frame's own where it is a camera's
        own = k_dlt.isfinite().all(-1) & plausible_intrinsics(k_dlt, height, width)
        k_all[general] = torch.where(own[:, None], k_dlt, k_all[general])
    K = intrinsics(*k_all.unbind(-1))
    R, t = plane_pose(uv, X, K)
    if general.any():  # keep the plane pose where it fits better (a noisy plane can pass the planarity test)
        k = k_all[general]
        _, _, _, r_dlt = _residuals(R_dlt, t_dlt, k, uv, X[general])
        _, _, _, r_plane = _residuals(R[general], t[general], k, uv, X[general])
        better = r_dlt.norm(dim=-1).median(dim=1).values < r_plane.norm(dim=-1).median(dim=1).values
        which = general.nonzero()[:, 0][better]
        R[which], t[which] = R_dlt[better], t_dlt[better]
    k = k_all[:1] if config.shared_intrinsics else k_all
    return k, R, t, planar, bool(general.any())


def fit_cameras(xyz: torch.Tensor, config: RegistrationConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit cameras to a pointmap video ``(F, H, W, 3)`` from a pixel subsample.

    Returns ``K (F, 3, 3)``, world-to-camera ``(F, 4, 4)`` and a dict of diagnostics (float64, on ``xyz``'s device).
    """
    config = config or RegistrationConfig()
    config.validate()
    frames, height, width, _ = xyz.shape
    index = sample_pixels(height, width, config.samples, config.seed, xyz.device)
    uv = pixel_grid(height, width, torch.float64, xyz.device).reshape(-1, 2)[index]  # (N, 2)
    X = xyz.reshape(frames, -1, 3)[:, index].double()  # (F, N, 3)
    stride = max(1, len(index) // config.init_samples)
    k, R, t, planar, refine_k = _initialize(uv[::stride], X[:, ::stride], (height, width), config)

    _, _, _, r = _residuals(R, t, k, uv, X)
    w = _huber_weights(r, config.huber)
    cost = (w * r.square().sum(-1)).sum()
    lam, history, steps = 1e-3, [float(cost)], 0
    for _ in range(config.iterations):
        Y, a, b, r = _residuals(R, t, k, uv, X)
        noise_var = (w * r.square().sum(-1)).sum() / (w * (2 + a * a + b * b)).sum()
        H, g = _normal_equations(Y, a, b, r, w, k, ~planar, noise_var)  # planar frames say little about K
        while lam < 1e10:
            d_pose, d_k = _lm_step(H, g, lam, refine_k, config.shared_intrinsics)
            rot = so3_exp(d_pose[:, :3])
            R_new, t_new = rot @ R, (rot @ t[..., None])[..., 0] + d_pose[:, 3:]
            k_new = k + d_k if d_k is not None else k
            _, _, _, r_new = _residuals(R_new, t_new, k_new, uv, X)
            cost_new = (w * r_new.square().sum(-1)).sum()
            if not plausible_intrinsics(k_new, height, width).all():  # a step out of what a camera can be
                cost_new = torch.full_like(cost_new, math.inf)
            if cost_new <= cost:
                break
            lam *= 10
        else:
            break
        steps += 1
        converged = cost - cost_new <= 1e-6 * cost
        R, t, k, lam = R_new, t_new, k_new, max(lam / 10, 1e-9)
        w = _huber_weights(r_new, config.huber)
        cost = (w * r_new.square().sum(-1)).sum()
        history.append(float(cost))
        if converged:
            break
    K = intrinsics(*k.expand(frames, 4).unbind(-1))
    info = {
        "lm_steps": steps,
        "cost": history,
        "planar_frames": planar.nonzero().flatten().tolist(),
        "samples": len(index),
    }
    return K, rigid(R, t), info


def smooth_cameras(world2cam: torch.Tensor, sigma: float) -> torch.Tensor:
    """World-to-camera poses ``(F, 4, 4)`` with each camera's centre and rotation the Gaussian-weighted mean over
    nearby frames (``sigma`` frames; weights to 3 sigma, the first and last frame repeated past the ends; rotations as
    unit quaternions of one sign, renormalized)."""
    frames = world2cam.shape[0]
    reach = math.ceil(3 * sigma)
    offsets = torch.arange(-reach, reach + 1, device=world2cam.device)
    weights = torch.exp(-0.5 * (offsets.to(world2cam.dtype) / sigma) ** 2)
    weights = (weights / weights.sum())[None, :, None]
    near = (torch.arange(frames, device=world2cam.device)[:, None] + offsets).clamp(0, frames - 1)  # (F, 2 reach + 1)
    cam2world = invert_rigid(world2cam)
    centres = (weights * cam2world[near, :3, 3]).sum(1)
    q = rotation_to_quaternion(cam2world[:, :3, :3])[near]  # (F, 2 reach + 1, 4)
    q = torch.where((q * q[:, reach : reach + 1]).sum(-1, keepdim=True) < 0, -q, q)  # one sign per frame's window
    to_camera = quaternion_to_rotation((weights * q).sum(1)).transpose(-1, -2)
    return rigid(to_camera, -(to_camera @ centres[..., None])[..., 0])


def register(xyz: torch.Tensor, config: RegistrationConfig | None = None, chunk: int = 8) -> Registration:
    """Cameras, depth, registered points and residuals of a pointmap video ``xyz (F, H, W, 3)`` (any float dtype,
    any device; outputs are float32 on the same device)."""
    check_pointmap(xyz)
    config = config or RegistrationConfig()
    with cpu_threads(1, xyz.device, blas=False):
        K64, world2cam64, info = fit_cameras(xyz, config)
        if config.smooth_frames > 0 and len(xyz) > 1:
            world2cam64 = smooth_cameras(world2cam64, config.smooth_frames)
    K, world2cam, cam2world = K64.float(), world2cam64.float(), invert_rigid(world2cam64).float()
    frames, height, width, _ = xyz.shape
    u = torch.arange(width, dtype=torch.float32, device=xyz.device) + 0.5
    v = torch.arange(height, dtype=torch.float32, device=xyz.device) + 0.5
    depth = xyz.new_empty((frames, height, width), dtype=torch.float32)
    points = xyz.new_empty((frames, height, width, 3), dtype=torch.float32)
    residual = torch.empty_like(depth)
    for s in range(0, frames, chunk):
        e = min(s + chunk, frames)
        R, t, k = world2cam[s:e, :3, :3], world2cam[s:e, :3, 3], K[s:e]
        X = xyz[s:e].float()
        Y = X @ R[:, None].transpose(-1, -2) + t[:, None, None]  # (f, H, W, 3) camera frame
        a = ((u - k[:, 0, 2, None]) / k[:, 0, 0, None])[:, None, :]  # (f, 1, W) ray x-slope
        b = ((v - k[:, 1, 2, None]) / k[:, 1, 1, None])[:, :, None]  # (f, H, 1) ray y-slope
        z = Y[..., 2]
        rx, ry = Y[..., 0] - z * a, Y[..., 1] - z * b  # offset from the pixel's ray at the same depth
        depth[s:e] = z
        torch.hypot(rx, ry, out=residual[s:e])
        p = points[s:e]  # the ray point in world: X - R^T (rx, ry, 0)
        p.copy_(X).addcmul_(rx[..., None], R[:, None, None, 0], value=-1).addcmul_(
            ry[..., None], R[:, None, None, 1], value=-1
        )
    planar = torch.zeros(frames, dtype=torch.bool, device=xyz.device)
    planar[info["planar_frames"]] = True
    return Registration(K, cam2world, depth, points, residual, planar, info)


def register_result(
    xyz: np.ndarray, frame_index: np.ndarray, config: RegistrationConfig, device: torch.device
) -> tuple[dict[str, np.ndarray], dict]:
    """Register frames ``frame_index (N,)`` of a result's pointmap ``xyz (F, H, W, 3)`` on ``device``: returns the
    arrays of a registration file (``fourdnex.geometry.results.REGISTRATION_ARRAYS``, numpy) and its diagnostics for
    the file's ``.json`` (size, settings, device, seconds, mean residual, LM steps, planar frames in the result's
    numbering, axes, version)."""
    points = torch.from_numpy(np.ascontiguousarray(xyz[frame_index])).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    reg = register(points, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    fitted = {"K": reg.K, "cam2world": reg.cam2world, "depth": reg.depth, "points": reg.points}
    fitted["residual"] = reg.residual
    arrays = {k: v.cpu().numpy() for k, v in fitted.items()} | {"frame_index": np.asarray(frame_index)}
    info = {
        "size": list(xyz.shape[1:3]),
        "config": asdict(config),
        "device": str(device),
        "seconds": round(seconds, 4),
        "mean_residual": float(reg.residual.mean()),
        "lm_steps": reg.info["lm_steps"],
        "planar_frames": [int(frame_index[f]) for f in reg.info["planar_frames"]],
        "axes": "opencv, camera-to-world, in the pointmap's frame and units",
        "version": __version__,
        "fit": FIT_VERSION,
    }
    return arrays, info
