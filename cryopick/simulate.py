"""Synthetic micrographs with full ground truth (``cryopick simulate``).

Particles are pseudo-atom models (points in 3-D, rendered as Gaussian blobs) rotated uniformly on SO(3) and
projected along z. Every micrograph gets its own CTF (defocus, astigmatism, B-factor envelope), distractors that
are not in the truth (ice contamination, a carbon film edge, small junk), a slow ice-thickness gradient and
Gaussian noise scaled to a per-pixel SNR:

    SNR = var(particle signal after the CTF, over the union of particle discs) / var(noise)

where the noise is white noise plus a CTF-modulated ice component (``ICE_NOISE_FRACTION`` of its variance).

Output layout under OUT (names relative to OUT)::

    micrographs/<prefix>_micNNN.mrc   z-scored image, pixel size in the header
    truth/<prefix>_micNNN.star        every particle whose centre lies inside the micrograph
    labels/<prefix>_micNNN.star       sparse hand-picking-like subset, only on the labeled micrographs
    micrographs.star                  RELION 3.1 micrographs STAR (optics + CTF columns)
    case.json                         parameters, seed and per-micrograph facts
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.spatial import cKDTree

from cryopick.errors import CryopickError
from cryopick.fsutil import write_json_atomic
from cryopick.io.mrc import write_mrc
from cryopick.io.relion import write_coordinate_star, write_micrographs_star
from cryopick.progress import info, progress_bar, warn

GENERATOR_VERSION = "1"
PARTICLE_SHAPES: tuple[str, ...] = ("shell", "blob", "rod", "ring")
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "int16")

VOLTAGE_KV = 300.0
CS_MM = 2.7
DEFOCUS_RANGE_UM = (0.8, 3.0)
ASTIGMATISM_MAX_A = 500.0  # |defocus U - defocus V|
AMPLITUDE_CONTRAST_RANGE = (0.07, 0.10)
B_FACTOR_RANGE_A2 = (50.0, 150.0)
ATOM_SIGMA_A = 3.0  # Gaussian width of one pseudo-atom
N_ATOMS = 3000

FILL_FRACTION_RANGE = (0.25, 0.35)  # fraction of the area covered by particle discs when no count is given
MIN_DISTANCE_FRACTION = 0.85  # minimum centre distance, in diameters
EDGE_MARGIN_FRACTION = 0.35  # centres may lie this many diameters outside the micrograph (not in the truth)
CARBON_ACCEPTANCE = 0.3  # relative particle density on carbon
ICE_NOISE_FRACTION = 0.25
INT16_SCALE, INT16_OFFSET = 16.0, 128.0  # int16 output = round(offset + scale * z-score), counts-like

LABEL_SIGMA_FRACTION = 0.02  # hand-picking position error, in diameters
LABEL_ERROR_CLIP = 2.5  # errors are truncated at this many sigmas

_STREAM_MODEL, _STREAM_MICROGRAPH, _STREAM_LABELS, _STREAM_OPTICS = 0, 1, 2, 3
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class SimulationParams:
    n_micrographs: int = 4
    shape: tuple[int, int] = (1024, 1024)  # (ny, nx) pixels
    pixel_size: float = 2.0  # Å/px
    diameter: float = 160.0  # Å
    particle: str = "shell"
    particles_per_micrograph: int | None = None  # centres inside the micrograph; None: fill 25-35% of the area
    snr: float = 0.05
    seed: int = 0
    label_fraction: float = 0.15  # labels / all truth particles; the labels lie on the labeled micrographs
    labeled_micrograph_fraction: float = 0.5
    contamination: bool = True
    junk_per_micrograph: float = 6.0
    carbon_probability: float = 0.25
    dtype: str = "float32"  # float32 | float16 | int16
    prefix: str = "sim"

    @property
    def diameter_px(self) -> float:
        return self.diameter / self.pixel_size


@dataclass(frozen=True)
class ParticleModel:
    shape: str
    diameter: float  # Å; every atom lies within diameter / 2 of the origin
    atoms: np.ndarray  # (N, 3) pseudo-atom positions in Å, centred on the origin


@dataclass(frozen=True)
class CTFParams:
    defocus_u: float  # Å, underfocus positive
    defocus_v: float  # Å
    defocus_angle: float  # degrees, from +x towards +y
    amplitude_contrast: float
    b_factor: float  # Å², envelope exp(-B k² / 4)
    voltage: float = VOLTAGE_KV  # kV
    cs: float = CS_MM  # mm


@dataclass
class ContaminationBlob:
    """Ice contamination: a union of soft-edged ellipses around (y, x).

    Each ellipse is (dy, dx, semi-axis a, semi-axis b, angle): offset from the centre and semi-axes in px,
    angle in radians.
    """

    y: float
    x: float
    ellipses: list[tuple[float, float, float, float, float]]
    edge_px: float
    radius_px: float  # bounding radius


@dataclass
class SimulatedMicrograph:
    """One micrograph and its parts (same z-score units): image = particle_signal + distractors + noise + background."""

    image: np.ndarray
    particle_signal: np.ndarray
    distractors: np.ndarray
    noise: np.ndarray
    background: np.ndarray
    centres: np.ndarray  # (n, 2) x, y of every placed particle, partly outside ones included
    inside: np.ndarray  # (n,) bool: centre inside the micrograph (the truth)
    junk: np.ndarray  # (m, 3) x, y, radius px
    ctf: CTFParams
    snr_measured: float
    label_distance: dict[str, np.ndarray] = field(default_factory=dict)  # per truth particle, for label choice
    facts: dict = field(default_factory=dict)

    @property
    def truth(self) -> np.ndarray:
        return self.centres[self.inside]


# --------------------------------------------------------------------------------------------------
# Particle models
# --------------------------------------------------------------------------------------------------

def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices uniform on SO(3) (normalised Gaussian quaternions), shape (n, 3, 3)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _points_in_unit_ball(rng, n: int) -> np.ndarray:
    """``n`` points spread evenly in the unit ball: one jittered point per cell of a cubic grid.

    Stratified rather than independent points: a few thousand pseudo-atoms then give a smooth density
    (like the tens of thousands of atoms in a real protein) instead of random speckle.
    """
    if n <= 0:
        return np.zeros((0, 3))
    h = (4 / 3 * np.pi / n) ** (1 / 3)
    axis = np.arange(-1 + h / 2, 1, h)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) <= 1]
    points = grid + rng.uniform(-h / 2, h / 2, grid.shape)
    points /= np.maximum(1.0, np.linalg.norm(points, axis=1, keepdims=True))
    if len(points) >= n:
        return points[rng.permutation(len(points))[:n]]
    extra = rng.standard_normal((n - len(points), 3))
    extra *= rng.random((len(extra), 1)) ** (1 / 3) / np.linalg.norm(extra, axis=1, keepdims=True)
    return np.concatenate([points, extra])


def _points_in_ellipsoid(rng, n: int, semi_axes, rotation=None, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    points = _points_in_unit_ball(rng, n) * np.asarray(semi_axes, float)
    if rotation is not None:
        points = points @ np.asarray(rotation).T
    return points + np.asarray(centre, float)


def _split_counts(n: int, weights) -> np.ndarray:
    """Integer counts summing to ``n`` in proportion to ``weights`` (largest remainder)."""
    weights = np.asarray(weights, float)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    return counts


def _octahedral_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube (signed permutation matrices with determinant +1)."""
    mats = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in np.ndindex(2, 2, 2):
            m = np.zeros((3, 3))
            m[np.arange(3), perm] = 1 - 2 * np.array(signs)
            if np.linalg.det(m) > 0:
                mats.append(m)
    return np.array(mats)


def _shell_atoms(rng, n: int) -> np.ndarray:
    """Apoferritin-like 24-mer: elongated subunits tangent to a sphere, octahedral symmetry, hollow core."""
    radial = np.array([1.0, 0.45, 0.2]) / np.linalg.norm([1.0, 0.45, 0.2])
    long_axis = np.cross(radial, [0.0, 0.0, 1.0])
    long_axis /= np.linalg.norm(long_axis)
    frame = np.stack([long_axis, np.cross(radial, long_axis), radial], axis=1)  # columns: long, wide, radial
    parts = []
    for g, count in zip(_octahedral_rotations(), _split_counts(n, np.ones(24))):
        subunit = _points_in_ellipsoid(rng, count, (0.38, 0.18, 0.14), frame, 0.8 * radial)
        parts.append(subunit @ g.T)
    return np.concatenate(parts)


def _blob_atoms(rng, n: int) -> np.ndarray:
    """Irregular globular protein: a union of 3-5 random ellipsoids around the origin."""
    n_lobes = int(rng.integers(3, 6))
    centres = rng.normal(0.0, 0.22, (n_lobes, 3))
    semi_axes = rng.uniform(0.3, 0.55, (n_lobes, 3))
    rotations = random_rotations(n_lobes, rng)
    counts = _split_counts(n, semi_axes.prod(axis=1))
    return np.concatenate([_points_in_ellipsoid(rng, c, s, r, m)
                           for c, s, r, m in zip(counts, semi_axes, rotations, centres)])


def _rod_atoms(rng, n: int) -> np.ndarray:
    """Elongated 3:1 filament segment: five lobes stacked along z with a helical offset, plus a core."""
    radius = 1.0 / 3.0
    z = np.linspace(-(1 - radius), 1 - radius, 5)
    phase = np.arange(5) * 2 * np.pi / 5
    centres = np.stack([0.2 * radius * np.cos(phase), 0.2 * radius * np.sin(phase), z], axis=1)
    counts = _split_counts(n, [1, 1, 1, 1, 1, 1.2])
    lobes = [_points_in_ellipsoid(rng, c, (radius, radius, 0.9 * radius), None, m) for c, m in zip(counts, centres)]
    core = _points_in_ellipsoid(rng, counts[-1], (0.7 * radius, 0.7 * radius, 1 - radius))
    return np.concatenate([*lobes, core])


def _ring_atoms(rng, n: int) -> np.ndarray:
    """Donut: seven overlapping lobes on a circle in the xy plane, leaving a central hole."""
    angles = np.arange(7) * 2 * np.pi / 7
    parts = []
    for a, count in zip(angles, _split_counts(n, np.ones(7))):
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        parts.append(_points_in_ellipsoid(rng, count, (0.3, 0.34, 0.3), rot, 0.66 * rot[:, 0]))
    return np.concatenate(parts)


_SHAPE_BUILDERS = {"shell": _shell_atoms, "blob": _blob_atoms, "rod": _rod_atoms, "ring": _ring_atoms}


def build_particle_model(shape: str, diameter: float, rng: np.random.Generator,
                         n_atoms: int = N_ATOMS) -> ParticleModel:
    """Pseudo-atom model of ``shape`` (one of PARTICLE_SHAPES), scaled so its largest radius is ``diameter / 2`` Å."""
    if shape not in _SHAPE_BUILDERS:
        raise CryopickError(f"unknown particle shape {shape!r}; choose one of {', '.join(PARTICLE_SHAPES)}")
    atoms = _SHAPE_BUILDERS[shape](rng, n_atoms)
    atoms -= atoms.mean(axis=0)
    atoms *= (diameter / 2) / np.linalg.norm(atoms, axis=1).max()
    return ParticleModel(shape, float(diameter), atoms)


def simulation_model(params: SimulationParams) -> ParticleModel:
    """The one particle species of a simulation (fixed by the seed)."""
    return build_particle_model(params.particle, params.diameter, np.random.default_rng([params.seed, _STREAM_MODEL]))


def _projected_atoms(model: ParticleModel, rotations: np.ndarray, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """x and y offsets in px, shape (N atoms, n copies), of every rotated copy projected along z."""
    atoms = (model.atoms / pixel_size).astype(np.float32)
    rot = rotations.astype(np.float32)
    return atoms @ rot[:, 0, :].T, atoms @ rot[:, 1, :].T


def project_particle(model: ParticleModel, rotation: np.ndarray, pixel_size: float, box: int) -> np.ndarray:
    """Noise-free projection (no CTF) of ``model`` rotated by ``rotation``, centred at (box // 2, box // 2)."""
    x, y = _projected_atoms(model, np.asarray(rotation, float)[None], pixel_size)
    image = _splat_objects((box, box), [(x[:, 0] + box // 2, y[:, 0] + box // 2, None)])
    return ndimage.gaussian_filter(image, ATOM_SIGMA_A / pixel_size)


# --------------------------------------------------------------------------------------------------
# Optics
# --------------------------------------------------------------------------------------------------

def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    v = voltage_kv * 1e3
    return 12.2642598 / math.sqrt(v + 0.978466e-6 * v * v)


def _frequencies(shape: tuple[int, int], pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (1/Å) on the rfft2 grid: ky (ny, 1), kx (1, nx // 2 + 1)."""
    ny, nx = shape
    ky = np.fft.fftfreq(ny, d=pixel_size).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(nx, d=pixel_size).astype(np.float32)[None, :]
    return ky, kx


def ctf_filter(shape: tuple[int, int], pixel_size: float, ctf: CTFParams) -> np.ndarray:
    """CTF x B-factor envelope x detector MTF on the rfft2 grid (float32); negative at low frequency.

    CTF = -sin(chi + asin(A)), chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4: dense objects are dark at
    underfocus, as in real micrographs.
    """
    ky, kx = _frequencies(shape, pixel_size)
    lam = electron_wavelength(ctf.voltage)
    theta = 2 * math.radians(ctf.defocus_angle)
    half_astig = 0.5 * (ctf.defocus_u - ctf.defocus_v)
    k2 = kx * kx + ky * ky
    # defocus(angle) k^2 = mean k^2 + half_astig ((kx^2 - ky^2) cos 2a + 2 kx ky sin 2a): no arctan needed
    chi = (kx * kx - ky * ky) * np.float32(half_astig * math.cos(theta))
    chi += (kx * ky) * np.float32(2 * half_astig * math.sin(theta))
    chi += k2 * np.float32(0.5 * (ctf.defocus_u + ctf.defocus_v))
    chi *= np.float32(np.pi * lam)
    k2 *= k2
    k2 *= np.float32(0.5 * np.pi * ctf.cs * 1e7 * lam ** 3)
    chi -= k2
    chi += np.float32(math.asin(ctf.amplitude_contrast))
    np.sin(chi, out=chi)
    chi *= -(np.exp(-0.25 * ctf.b_factor * ky * ky) * np.sinc(ky * pixel_size)).astype(np.float32)
    chi *= (np.exp(-0.25 * ctf.b_factor * kx * kx) * np.sinc(kx * pixel_size)).astype(np.float32)
    return chi


def _with_atom_blur(transfer: np.ndarray, shape: tuple[int, int], pixel_size: float) -> np.ndarray:
    """``transfer`` times the Fourier transform of one pseudo-atom's Gaussian (separable in ky, kx)."""
    ky, kx = _frequencies(shape, pixel_size)
    c = np.float32(-2 * np.pi ** 2 * ATOM_SIGMA_A ** 2)
    blurred = transfer * np.exp(c * ky * ky)
    blurred *= np.exp(c * kx * kx)
    return blurred


def _mean_square_full(filt: np.ndarray, nx: int) -> float:
    """Mean of filt² over the full FFT grid, given its real rfft2 half (inner columns count twice)."""
    weights = np.full(filt.shape[1], 2.0)
    weights[0] = 1.0
    if nx % 2 == 0:
        weights[-1] = 1.0
    return float(np.einsum("ij,ij->j", filt, filt, dtype=np.float64) @ weights / (filt.shape[0] * nx))


def _filtered(image: np.ndarray, filt: np.ndarray) -> np.ndarray:
    spectrum = scipy.fft.rfft2(image, workers=-1)
    spectrum *= filt
    return scipy.fft.irfft2(spectrum, s=image.shape, workers=-1, overwrite_x=True).astype(np.float32, copy=False)


def _noise(rng, shape: tuple[int, int], transfer: np.ndarray, white_sigma: float, ice_sigma: float) -> np.ndarray:
    """White noise (std ``white_sigma``) plus white noise of std ``ice_sigma`` seen through ``transfer``.

    Both are Gaussian with independent Fourier coefficients, so their sum is drawn at once in Fourier space with
    power white² + ice² transfer²: one random draw and one FFT. A real white image of variance s² has
    E|F|² = N s² per rfft2 coefficient; a complex normal has E|z|² = 2.
    """
    ny, nx = shape
    amplitude = transfer * transfer
    amplitude *= np.float32(ice_sigma ** 2)
    amplitude += np.float32(white_sigma ** 2)
    np.sqrt(amplitude, out=amplitude)
    amplitude *= np.float32(math.sqrt(ny * nx / 2))
    z = rng.standard_normal((ny, nx // 2 + 1, 2), dtype=np.float32).view(np.complex64)[..., 0]
    z *= amplitude
    del amplitude
    return scipy.fft.irfft2(z, s=shape, workers=-1, overwrite_x=True).astype(np.float32, copy=False)


def draw_ctf(rng: np.random.Generator, amplitude_contrast: float) -> CTFParams:
    mean = rng.uniform(*DEFOCUS_RANGE_UM) * 1e4
    astig = rng.uniform(0.0, ASTIGMATISM_MAX_A)
    return CTFParams(defocus_u=mean + astig / 2, defocus_v=mean - astig / 2,
                     defocus_angle=float(rng.uniform(0.0, 180.0)), amplitude_contrast=amplitude_contrast,
                     b_factor=float(rng.uniform(*B_FACTOR_RANGE_A2)))


def simulation_amplitude_contrast(params: SimulationParams) -> float:
    """One amplitude contrast per simulation: the micrographs share one optics group."""
    return float(np.random.default_rng([params.seed, _STREAM_OPTICS]).uniform(*AMPLITUDE_CONTRAST_RANGE))


# --------------------------------------------------------------------------------------------------
# Layout: contamination, carbon, particles, junk
# --------------------------------------------------------------------------------------------------

def _draw_contamination(rng, shape, diameter_px: float, enabled: bool) -> list[ContaminationBlob]:
    if not enabled:
        return []
    ny, nx = shape
    n = rng.poisson(0.6 * math.sqrt(ny * nx / 1024 ** 2))
    blobs = []
    for _ in range(n):
        size = diameter_px * math.exp(rng.uniform(math.log(1.5), math.log(6.0)))  # diameter of the main lobe
        ellipses = []
        for j in range(int(rng.integers(1, 4))):
            offset = (0.0, 0.0) if j == 0 else tuple(rng.normal(0.0, 0.3 * size, 2))
            semi = size / 2 * rng.uniform(0.5, 1.0, 2) if j else size / 2 * rng.uniform(0.75, 1.0, 2)
            ellipses.append((float(offset[0]), float(offset[1]), float(semi[0]), float(semi[1]),
                             float(rng.uniform(0, np.pi))))
        reach = max(math.hypot(e[0], e[1]) + max(e[2], e[3]) for e in ellipses)
        edge = max(1.5, 0.03 * size)
        blobs.append(ContaminationBlob(float(rng.uniform(0, ny - 1)), float(rng.uniform(0, nx - 1)),
                                       ellipses, edge, reach + 3 * edge))
    return blobs


def _render_contamination(shape, blobs: list[ContaminationBlob]) -> np.ndarray | None:
    """Soft mask in [0, 1]: 1 inside the ice blobs, a tanh edge ``edge_px`` wide; None without blobs."""
    if not blobs:
        return None
    ny, nx = shape
    mask = np.zeros(shape, np.float32)
    for b in blobs:
        y0, y1 = max(int(b.y - b.radius_px), 0), min(int(b.y + b.radius_px) + 2, ny)
        x0, x1 = max(int(b.x - b.radius_px), 0), min(int(b.x + b.radius_px) + 2, nx)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - b.y
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - b.x
        local = np.zeros((y1 - y0, x1 - x0), np.float32)
        for dy, dx, a, c, theta in b.ellipses:
            u = (xx - dx) * math.cos(theta) + (yy - dy) * math.sin(theta)
            v = -(xx - dx) * math.sin(theta) + (yy - dy) * math.cos(theta)
            r = np.sqrt((u / a) ** 2 + (v / c) ** 2)
            local = np.maximum(local, 0.5 * (1 + np.tanh((1 - r) * (0.5 * (a + c)) / b.edge_px)))
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], local)
    return mask


def _render_carbon(rng, shape) -> np.ndarray:
    """Carbon film: the side of a straight or gently curved edge covering 10-40 % of the image; soft mask."""
    ny, nx = shape
    theta = rng.uniform(0, 2 * np.pi)
    normal, tangent = (math.cos(theta), math.sin(theta)), (-math.sin(theta), math.cos(theta))
    curvature = rng.uniform(-1.0, 1.0) / max(ny, nx)
    area = rng.uniform(0.1, 0.4)
    edge_px = rng.uniform(1.0, 3.0)

    def signed_distance(step: int) -> np.ndarray:
        yy = np.arange(0, ny, step, dtype=np.float32)[:, None] - np.float32(ny / 2)
        xx = np.arange(0, nx, step, dtype=np.float32)[None, :] - np.float32(nx / 2)
        along = xx * np.float32(tangent[0]) + yy * np.float32(tangent[1])
        along *= along
        along *= np.float32(curvature)
        along += xx * np.float32(normal[0])
        along += yy * np.float32(normal[1])
        return along

    coarse_step = max(1, int(math.sqrt(ny * nx / 250_000)))
    threshold = float(np.quantile(signed_distance(coarse_step), 1 - area))  # sets the covered fraction
    mask = signed_distance(1)
    mask -= np.float32(threshold)
    mask *= np.float32(1 / edge_px)
    np.tanh(mask, out=mask)
    mask += 1
    mask *= 0.5
    return mask


def _distance_map(obstacle_coarse: np.ndarray, cell: int) -> np.ndarray:
    """Distance in px from each ``cell``-sized block to the nearest obstacle block (1e9 if there is none)."""
    if not obstacle_coarse.any():
        return np.full(obstacle_coarse.shape, 1e9, np.float32)
    return (ndimage.distance_transform_edt(~obstacle_coarse) * cell).astype(np.float32)


def _coarse(mask: np.ndarray | None, shape, cell: int) -> np.ndarray:
    """``mask`` sampled at the centre of each ``cell``-sized block (zeros when there is no mask)."""
    if mask is None:
        ny, nx = shape
        return np.zeros((len(range(cell // 2, ny, cell)), len(range(cell // 2, nx, cell))), np.float32)
    return mask[cell // 2::cell, cell // 2::cell]


def _lookup(coarse: np.ndarray, cell: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    iy = np.clip((np.asarray(ys) // cell).astype(int), 0, coarse.shape[0] - 1)
    ix = np.clip((np.asarray(xs) // cell).astype(int), 0, coarse.shape[1] - 1)
    return coarse[iy, ix]


def _target_inside_count(rng, params: SimulationParams) -> int:
    if params.particles_per_micrograph is not None:
        return int(params.particles_per_micrograph)
    ny, nx = params.shape
    radius = params.diameter_px / 2
    return int(round(rng.uniform(*FILL_FRACTION_RANGE) * ny * nx / (np.pi * radius ** 2)))


def _place_particles(rng, params: SimulationParams, n_inside: int, contamination_distance: np.ndarray,
                     carbon_coarse: np.ndarray, cell: int) -> np.ndarray:
    """Random sequential placement with a minimum centre distance; centres may lie a little off the image.

    Returns (n, 2) x, y. Particles keep half a diameter from ice contamination and are rarer on carbon.
    """
    ny, nx = params.shape
    d = params.diameter_px
    margin = EDGE_MARGIN_FRACTION * d
    area_ratio = (ny - 1 + 2 * margin) * (nx - 1 + 2 * margin) / max((ny - 1) * (nx - 1), 1)
    n_total = int(round(n_inside * area_ratio))
    min_dist = MIN_DISTANCE_FRACTION * d
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    placed: list[tuple[float, float]] = []
    attempts, max_attempts, batch = 0, 40 * n_total + 1000, 1024
    while len(placed) < n_total and attempts < max_attempts:
        attempts += batch
        ys = rng.uniform(-margin, ny - 1 + margin, batch)
        xs = rng.uniform(-margin, nx - 1 + margin, batch)
        clear = _lookup(contamination_distance, cell, ys, xs) >= 0.5 * d
        on_carbon = _lookup(carbon_coarse, cell, ys, xs)
        keep = clear & (rng.random(batch) < 1 - (1 - CARBON_ACCEPTANCE) * on_carbon)
        for y, x in zip(ys[keep], xs[keep]):
            gy, gx = int(y // min_dist), int(x // min_dist)
            near = (p for i in (-1, 0, 1) for j in (-1, 0, 1) for p in grid.get((gy + i, gx + j), ()))
            if all((y - py) ** 2 + (x - px) ** 2 >= min_dist ** 2 for py, px in near):
                grid.setdefault((gy, gx), []).append((y, x))
                placed.append((y, x))
                if len(placed) == n_total:
                    break
    yx = np.array(placed, dtype=np.float64).reshape(-1, 2)
    return yx[:, ::-1].copy()


def _place_junk(rng, params: SimulationParams, centres: np.ndarray, contamination_distance: np.ndarray,
                cell: int) -> np.ndarray:
    """Small compact blobs inside the image that at most touch a particle: (m, 3) x, y, radius in px."""
    ny, nx = params.shape
    d = params.diameter_px
    n = rng.poisson(params.junk_per_micrograph) if params.junk_per_micrograph > 0 else 0
    tree = cKDTree(centres) if len(centres) else None
    junk = []
    for _ in range(n):
        radius = 0.5 * d * rng.uniform(0.25, 0.6)
        for _attempt in range(50):
            x, y = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
            if _lookup(contamination_distance, cell, np.array([y]), np.array([x]))[0] < radius:
                continue
            if tree is not None and tree.query([x, y])[0] < 0.8 * (0.5 * d + radius):
                continue
            junk.append((x, y, radius))
            break
    return np.array(junk, dtype=np.float64).reshape(-1, 3)


def disc_union(shape, centres: np.ndarray, diameter_px: float) -> np.ndarray:
    """Boolean mask of the union of discs of the particle diameter around ``centres`` (x, y): the SNR region."""
    ny, nx = shape
    r = diameter_px / 2
    mask = np.zeros(shape, bool)
    for x, y in centres:
        y0, y1 = max(int(math.floor(y - r)), 0), min(int(math.ceil(y + r)) + 1, ny)
        x0, x1 = max(int(math.floor(x - r)), 0), min(int(math.ceil(x + r)) + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1)[:, None] - y
        xx = np.arange(x0, x1)[None, :] - x
        mask[y0:y1, x0:x1] |= yy * yy + xx * xx <= r * r
    return mask


@dataclass
class _Layout:
    contamination: np.ndarray | None  # soft mask
    carbon: np.ndarray | None  # soft mask
    n_contamination: int
    centres: np.ndarray  # (n, 2) x, y
    junk: np.ndarray  # (m, 3) x, y, radius
    obstacle_distance: np.ndarray  # coarse distance (px) to ice or carbon
    cell: int


def _draw_layout(rng, params: SimulationParams) -> _Layout:
    shape = params.shape
    d = params.diameter_px
    cell = max(1, int(d // 8))
    blobs = _draw_contamination(rng, shape, d, params.contamination)
    contamination = _render_contamination(shape, blobs)
    carbon = _render_carbon(rng, shape) if rng.random() < params.carbon_probability else None
    ice_coarse = _coarse(contamination, shape, cell) > 0.5
    carbon_coarse = _coarse(carbon, shape, cell)
    contamination_distance = _distance_map(ice_coarse, cell)
    centres = _place_particles(rng, params, _target_inside_count(rng, params), contamination_distance,
                               carbon_coarse, cell)
    junk = _place_junk(rng, params, centres, contamination_distance, cell)
    return _Layout(contamination, carbon, len(blobs), centres, junk,
                   _distance_map(ice_coarse | (carbon_coarse > 0.5), cell), cell)


# --------------------------------------------------------------------------------------------------
# One micrograph
# --------------------------------------------------------------------------------------------------

def _splat_objects(shape, objects: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """Add each object's points (x px, y px, weights) to the nearest pixel of one image, one small box at a time.

    Working per object keeps the scratch memory to one box instead of an image-sized histogram.
    """
    ny, nx = shape
    image = np.zeros(shape, np.float32)
    for xs, ys, weights in objects:
        ix, iy = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
        x0, y0 = max(int(ix.min()), 0), max(int(iy.min()), 0)
        x1, y1 = min(int(ix.max()) + 1, nx), min(int(iy.max()) + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        ok = (ix >= x0) & (ix < x1) & (iy >= y0) & (iy < y1)
        width = x1 - x0
        local = np.bincount((iy[ok] - y0) * width + (ix[ok] - x0), None if weights is None else weights[ok],
                            minlength=(y1 - y0) * width)
        image[y0:y1, x0:x1] += local.reshape(y1 - y0, width).astype(np.float32)
    return image


def _render_particles(shape, model: ParticleModel, centres: np.ndarray, rotations: np.ndarray,
                      pixel_size: float) -> np.ndarray:
    x, y = _projected_atoms(model, rotations, pixel_size)
    return _splat_objects(shape, [(x[:, i] + np.float32(cx), y[:, i] + np.float32(cy), None)
                                  for i, (cx, cy) in enumerate(centres)])


def _render_junk(rng, shape, junk: np.ndarray, pixel_size: float, diameter_px: float) -> np.ndarray:
    """Junk as random pseudo-atom blobs, 1-2x as dense in projection as a particle."""
    objects = []
    for x, y, radius in junk:
        blob = build_particle_model("blob", 2 * radius * pixel_size, rng, n_atoms=400)
        mass = N_ATOMS * (2 * radius / diameter_px) ** 2 * rng.uniform(1.0, 2.0)
        objects.append((blob.atoms[:, 0] / pixel_size + x, blob.atoms[:, 1] / pixel_size + y,
                        np.full(len(blob.atoms), mass / len(blob.atoms))))
    return _splat_objects(shape, objects)


def _ice_gradient(rng, shape) -> np.ndarray:
    """A linear ramp in a random direction spanning [-1, 1] (thicker ice on one side)."""
    ny, nx = shape
    theta = rng.uniform(0, 2 * np.pi)
    yy = np.linspace(-1, 1, ny, dtype=np.float32)[:, None] * np.float32(math.sin(theta))
    xx = np.linspace(-1, 1, nx, dtype=np.float32)[None, :] * np.float32(math.cos(theta))
    return (xx + yy) / np.float32(max(abs(xx).max() + abs(yy).max(), 1e-6))


def _distractors(rng, params: SimulationParams, layout: _Layout, transfer: np.ndarray,
                 noise_sigma: float) -> np.ndarray:
    """Ice, carbon and junk: phase objects through the CTF plus the amplitude loss of thick ice and carbon.

    The amplitude term makes ice and carbon dark whatever the defocus, as in real micrographs.
    """
    shape = params.shape
    d = params.diameter_px
    particle_density = N_ATOMS / (np.pi * (d / 2) ** 2)  # mean projected mass per px over a particle disc
    phase = _render_junk(rng, shape, layout.junk, params.pixel_size, d)
    absorption = np.zeros(shape, np.float32)
    scratch = np.empty(shape, np.float32)
    if layout.contamination is not None:
        phase += np.multiply(layout.contamination, np.float32(rng.uniform(1.5, 3.0) * particle_density), out=scratch)
        absorption -= np.multiply(layout.contamination, np.float32(rng.uniform(3.0, 6.0) * noise_sigma), out=scratch)
    if layout.carbon is not None:
        texture_sigma = math.sqrt(rng.uniform(0.3, 0.8) * noise_sigma ** 2
                                  / max(_mean_square_full(transfer, shape[1]), 1e-12))
        texture = rng.standard_normal(dtype=np.float32, out=scratch)
        texture *= np.float32(texture_sigma)
        texture += np.float32(rng.uniform(1.0, 2.0) * particle_density)
        texture *= layout.carbon
        phase += texture
        absorption -= np.multiply(layout.carbon, np.float32(rng.uniform(0.5, 1.5) * noise_sigma), out=scratch)
    del scratch
    if layout.contamination is None and layout.carbon is None and len(layout.junk) == 0:
        return absorption
    absorption += _filtered(phase, transfer)
    return absorption


def _micrograph_draws(params: SimulationParams, index: int) -> tuple[np.random.Generator, CTFParams, _Layout]:
    """Micrograph ``index``'s random stream after its CTF and layout are drawn, with those two."""
    rng = np.random.default_rng([params.seed, _STREAM_MICROGRAPH, index])
    ctf = draw_ctf(rng, simulation_amplitude_contrast(params))
    return rng, ctf, _draw_layout(rng, params)


def carbon_mask(params: SimulationParams, index: int) -> np.ndarray | None:
    """Micrograph ``index``'s carbon film as a soft (ny, nx) mask in [0, 1] (None: no carbon), as simulated."""
    params = replace(params, shape=(int(params.shape[0]), int(params.shape[1])))
    return _micrograph_draws(params, index)[2].carbon


def simulate_micrograph(params: SimulationParams, index: int,
                        model: ParticleModel | None = None) -> SimulatedMicrograph:
    """Micrograph ``index`` of the simulation ``params`` (deterministic per seed and index)."""
    params = replace(params, shape=(int(params.shape[0]), int(params.shape[1])))
    model = model or simulation_model(params)
    rng, ctf, layout = _micrograph_draws(params, index)
    shape = params.shape
    ny, nx = shape
    d = params.diameter_px
    centres = layout.centres
    rotations = random_rotations(len(centres), rng)

    transfer = ctf_filter(shape, params.pixel_size, ctf)
    blurred_transfer = _with_atom_blur(transfer, shape, params.pixel_size)
    signal = _filtered(_render_particles(shape, model, centres, rotations, params.pixel_size), blurred_transfer)
    discs = disc_union(shape, centres, d)
    signal_var = float(signal[discs].var()) if discs.any() else 0.0
    noise_sigma = math.sqrt(signal_var / params.snr) if signal_var > 0 else 1.0

    distractors = _distractors(rng, params, layout, blurred_transfer, noise_sigma)
    ice_sigma = math.sqrt(ICE_NOISE_FRACTION / max(_mean_square_full(transfer, nx), 1e-12)) * noise_sigma
    noise = _noise(rng, shape, transfer, math.sqrt(1 - ICE_NOISE_FRACTION) * noise_sigma, ice_sigma)
    background = _ice_gradient(rng, shape)
    background *= np.float32(rng.uniform(0.1, 0.5) * noise_sigma)

    image = signal + distractors
    image += noise
    image += background
    mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64)) or 1.0
    image -= np.float32(mean)
    background -= np.float32(mean)
    scale = np.float32(1.0 / std)
    for part in (image, signal, distractors, noise, background):
        part *= scale

    inside = ((centres[:, 0] >= 0) & (centres[:, 0] <= nx - 1) & (centres[:, 1] >= 0) & (centres[:, 1] <= ny - 1))
    truth = centres[inside]
    edge = np.minimum.reduce([truth[:, 0], truth[:, 1], nx - 1 - truth[:, 0], ny - 1 - truth[:, 1]]) \
        if len(truth) else np.zeros(0)
    snr_measured = float(signal[discs].var() / noise.var(dtype=np.float64)) if discs.any() else 0.0
    return SimulatedMicrograph(
        image=image, particle_signal=signal, distractors=distractors, noise=noise, background=background,
        centres=centres, inside=inside, junk=layout.junk, ctf=ctf, snr_measured=snr_measured,
        label_distance=_label_distances(centres, inside, layout, edge),
        facts={
            "n_particles": int(inside.sum()),
            "n_placed": int(len(centres)),
            "n_partial_outside": int((edge < d / 2).sum()),
            "n_junk": int(len(layout.junk)),
            "n_contamination": layout.n_contamination,
            "carbon": layout.carbon is not None,
            "carbon_area_fraction": round(float(layout.carbon.mean(dtype=np.float64)), 4)
            if layout.carbon is not None else 0.0,
            "snr_measured": round(snr_measured, 5),
        },
    )


def _label_distances(centres: np.ndarray, inside: np.ndarray, layout: _Layout,
                     edge: np.ndarray) -> dict[str, np.ndarray]:
    """Per truth particle: nearest neighbour, nearest junk edge, nearest ice/carbon and image edge (px)."""
    truth = centres[inside]
    if len(truth) == 0:
        empty = np.zeros(0)
        return {"neighbour": empty, "junk": empty, "obstacle": empty, "edge": empty}
    if len(centres) > 1:
        neighbour = cKDTree(centres).query(truth, k=2)[0][:, 1]
    else:
        neighbour = np.full(len(truth), np.inf)
    junk = layout.junk
    if len(junk):
        gaps = np.hypot(truth[:, None, 0] - junk[None, :, 0], truth[:, None, 1] - junk[None, :, 1]) - junk[None, :, 2]
        junk_gap = gaps.min(axis=1)
    else:
        junk_gap = np.full(len(truth), np.inf)
    obstacle = _lookup(layout.obstacle_distance, layout.cell, truth[:, 1], truth[:, 0]).astype(float)
    return {"neighbour": neighbour, "junk": junk_gap, "obstacle": obstacle, "edge": edge}


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------

def _label_tiers(dist: dict[str, np.ndarray], d: float) -> np.ndarray:
    """0 = clearly isolated (what a person picks first) ... 3 = anything; labels are drawn tier by tier."""
    tiers = np.full(len(dist["edge"]), 3)
    rules = [(2, 1.0, 0.5, 0.0, 0.5), (1, 1.1, 0.75, 0.5, 0.5), (0, 1.3, 1.0, 0.75, 0.75)]
    for tier, nn, obstacle, junk, edge in rules:
        ok = ((dist["neighbour"] >= nn * d) & (dist["obstacle"] >= obstacle * d)
              & (dist["junk"] >= junk * d) & (dist["edge"] >= edge * d))
        tiers[ok] = tier
    return tiers


def choose_labeled_micrographs(params: SimulationParams) -> list[int]:
    n = max(1, int(round(params.labeled_micrograph_fraction * params.n_micrographs)))
    n = min(n, params.n_micrographs)
    rng = np.random.default_rng([params.seed, _STREAM_LABELS])
    return sorted(int(i) for i in rng.choice(params.n_micrographs, n, replace=False))


def _pick_labels(rng, params: SimulationParams, truth: np.ndarray, tiers: np.ndarray, count: int) -> np.ndarray:
    """``count`` truth particles, best tier first, with a truncated Gaussian hand-picking error (x, y)."""
    order = np.lexsort((rng.random(len(truth)), tiers))[:count]
    chosen = truth[np.sort(order)]
    sigma = LABEL_SIGMA_FRACTION * params.diameter_px
    error = rng.normal(0.0, sigma, chosen.shape)
    length = np.linalg.norm(error, axis=1, keepdims=True)
    error *= np.minimum(1.0, LABEL_ERROR_CLIP * sigma / np.maximum(length, 1e-12))
    ny, nx = params.shape
    labels = chosen + error
    labels[:, 0] = np.clip(labels[:, 0], 0, nx - 1)
    labels[:, 1] = np.clip(labels[:, 1], 0, ny - 1)
    return labels


def make_labels(params: SimulationParams, micrographs: dict[int, tuple[np.ndarray, dict]]) -> dict[int, np.ndarray]:
    """Labels for each labeled micrograph index: ``label_fraction`` of all truth particles, split by counts.

    ``micrographs`` maps index -> (truth x, y array, label distances) for every micrograph.
    """
    labeled = choose_labeled_micrographs(params)
    total_truth = sum(len(t) for t, _ in micrographs.values())
    counts = np.array([len(micrographs[i][0]) for i in labeled])
    n_labels = min(int(round(params.label_fraction * total_truth)), int(counts.sum()))
    split = _split_counts(n_labels, counts) if counts.sum() else np.zeros(len(labeled), int)
    rng = np.random.default_rng([params.seed, _STREAM_LABELS, 1])
    out = {}
    for i, count in zip(labeled, split):
        truth, dist = micrographs[i]
        out[i] = _pick_labels(rng, params, truth, _label_tiers(dist, params.diameter_px), int(count))
    return out


# --------------------------------------------------------------------------------------------------
# Whole simulation
# --------------------------------------------------------------------------------------------------

def validate_params(params: SimulationParams) -> None:
    """Raise one CryopickError listing every unusable parameter."""
    try:
        ny, nx = (int(v) for v in params.shape)
    except (TypeError, ValueError):
        raise CryopickError(f"invalid simulation parameters: shape {params.shape!r} must be two integers "
                            "(rows, columns)") from None
    problems = []
    if params.n_micrographs < 1:
        problems.append("n_micrographs must be at least 1")
    if min(ny, nx) < 16:
        problems.append(f"shape {ny}x{nx} is too small (at least 16 px per side)")
    if not params.pixel_size > 0 or not params.diameter > 0:
        problems.append("pixel_size and diameter must be positive")
    elif not 4 <= params.diameter_px <= min(ny, nx):
        problems.append(f"the diameter is {params.diameter_px:.1f} px; it must lie between 4 px and the "
                        f"micrograph's smaller side ({min(ny, nx)} px)")
    if params.particle not in PARTICLE_SHAPES:
        problems.append(f"unknown particle shape {params.particle!r}; choose one of {', '.join(PARTICLE_SHAPES)}")
    if params.particles_per_micrograph is not None and params.particles_per_micrograph < 0:
        problems.append("particles_per_micrograph must not be negative")
    if not params.snr > 0:
        problems.append("snr must be positive")
    for name in ("label_fraction", "labeled_micrograph_fraction", "carbon_probability"):
        if not 0 <= getattr(params, name) <= 1:
            problems.append(f"{name} must lie in [0, 1]")
    if params.junk_per_micrograph < 0:
        problems.append("junk_per_micrograph must not be negative")
    if params.dtype not in OUTPUT_DTYPES:
        problems.append(f"dtype {params.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if not _PREFIX_RE.match(params.prefix):
        problems.append(f"prefix {params.prefix!r} may hold only letters, digits, '-' and '_'")
    if problems:
        raise CryopickError("invalid simulation parameters: " + "; ".join(problems))


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier simulation unless ``overwrite``; never delete files it did not write."""
    if out.exists() and not out.is_dir():
        raise CryopickError(f"{out}: exists and is not a directory")
    ours = [out / "micrographs", out / "truth", out / "labels", out / "micrographs.star"]
    if (out / "case.json").exists():
        if not overwrite:
            raise CryopickError(f"{out}: already holds a simulation (case.json); choose an empty directory "
                                "or replace it with --overwrite")
        for sub, pattern in (("micrographs", "*.mrc"), ("truth", "*.star"), ("labels", "*.star")):
            for path in (out / sub).glob(pattern):
                path.unlink()
        (out / "micrographs.star").unlink(missing_ok=True)
    else:
        clash = [p for p in ours if p.exists() and (p.is_file() or any(p.iterdir()))]
        if clash:
            raise CryopickError(f"{out}: {clash[0].name} already exists and this is not a cryopick simulation "
                                "(no case.json); choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)


def _to_output_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.clip(np.round(INT16_OFFSET + INT16_SCALE * image), -32768, 32767).astype(np.int16)
    return image.astype(dtype, copy=False)


def _case_header(params: SimulationParams, model: ParticleModel, amplitude_contrast: float) -> dict:
    ny, nx = params.shape
    parameters = asdict(params)
    parameters["shape"] = [ny, nx]
    return {
        "generator": "cryopick.simulate",
        "generator_version": GENERATOR_VERSION,
        "complete": False,
        "seed": params.seed,
        "parameters": parameters,
        "pixel_size_A": params.pixel_size,
        "shape_rows_cols": [ny, nx],
        "shape_note": "rows x cols (MRC ny x nx); x = column, y = row, 0-based centres",
        "dtype": params.dtype,
        "particle": {
            "type": model.shape,
            "diameter_A": params.diameter,
            "diameter_px": round(params.diameter_px, 3),
            "n_atoms": int(len(model.atoms)),
            "atom_sigma_A": ATOM_SIGMA_A,
        },
        "min_distance_px": round(MIN_DISTANCE_FRACTION * params.diameter_px, 4),
        "optics": {
            "voltage_kV": VOLTAGE_KV, "cs_mm": CS_MM, "amplitude_contrast": round(amplitude_contrast, 4),
            "defocus_range_um": list(DEFOCUS_RANGE_UM), "b_factor_range_A2": list(B_FACTOR_RANGE_A2),
        },
        "snr_target": params.snr,
        "snr_definition": "var(particle signal after CTF) over the union of particle-diameter discs / var(noise); "
                          f"noise = white + CTF-filtered ice ({ICE_NOISE_FRACTION:.0%} of its variance); "
                          "distractors and the ice gradient are not noise",
        "normalisation": "z-score per micrograph" + (
            f"; int16 = round({INT16_OFFSET:g} + {INT16_SCALE:g} * z)" if params.dtype == "int16" else ""),
    }


def _micrograph_record(stem: str, params: SimulationParams, mic: SimulatedMicrograph) -> dict:
    return {
        "name": stem,
        "file": f"micrographs/{stem}.mrc",
        "defocus_u_A": round(mic.ctf.defocus_u, 1),
        "defocus_v_A": round(mic.ctf.defocus_v, 1),
        "defocus_angle_deg": round(mic.ctf.defocus_angle, 2),
        "b_factor_A2": round(mic.ctf.b_factor, 1),
        **mic.facts,
        "snr_target": params.snr,
    }


def simulate(out_dir: str | Path, params: SimulationParams | None = None, quiet: bool = True,
             overwrite: bool = False) -> dict:
    """Write a simulated data set (micrographs, truth, sparse labels, micrographs.star, case.json) to ``out_dir``.

    Returns the case.json dictionary. Refuses a directory that already holds a simulation unless ``overwrite``.
    """
    params = params or SimulationParams()
    validate_params(params)
    params = replace(params, shape=(int(params.shape[0]), int(params.shape[1])))
    out = Path(out_dir)
    _prepare_output_dir(out, overwrite)
    model = simulation_model(params)
    amplitude_contrast = simulation_amplitude_contrast(params)
    case = _case_header(params, model, amplitude_contrast)
    write_json_atomic(out / "case.json", case)  # marks the directory as a simulation even if interrupted

    stems = [f"{params.prefix}_mic{i:03d}" for i in range(params.n_micrographs)]
    records, truths, ctfs = _write_micrographs(out, params, model, stems, quiet)

    labels = make_labels(params, truths)
    for i, xy in labels.items():
        write_coordinate_star(out / "labels" / f"{stems[i]}.star", xy[:, 0], xy[:, 1], np.ones(len(xy)))
    for i, record in enumerate(records):
        record["labelled"] = i in labels
        record["n_labels"] = int(len(labels.get(i, ())))

    write_micrographs_star(
        out / "micrographs.star", [r["file"] for r in records], params.pixel_size, voltage=VOLTAGE_KV, cs=CS_MM,
        amplitude_contrast=round(amplitude_contrast, 4),
        extra={"rlnDefocusU": [c.defocus_u for c in ctfs], "rlnDefocusV": [c.defocus_v for c in ctfs],
               "rlnDefocusAngle": [c.defocus_angle for c in ctfs], "rlnCtfBfactor": [-c.b_factor for c in ctfs]},
    )
    case.update(_case_summary(params, records, stems, labels))
    n_particles, n_labels = case["n_particles"], case["n_labels"]
    write_json_atomic(out / "case.json", case)
    info(f"simulated {params.n_micrographs} micrographs, {n_particles} particles, {n_labels} labels -> {out}", quiet)
    return case


def _write_micrographs(out: Path, params: SimulationParams, model, stems: list[str], quiet: bool):
    """Simulate and write every micrograph and its truth; returns their records, truths and CTFs."""
    records, truths, ctfs = [], {}, []
    with progress_bar(quiet) as bar:
        task = bar.add_task("simulating micrographs", total=params.n_micrographs)
        for i, stem in enumerate(stems):
            mic = simulate_micrograph(params, i, model)
            write_mrc(out / "micrographs" / f"{stem}.mrc", _to_output_dtype(mic.image, params.dtype), params.pixel_size)
            truth = mic.truth
            write_coordinate_star(out / "truth" / f"{stem}.star", truth[:, 0], truth[:, 1], np.ones(len(truth)))
            truths[i] = (truth, mic.label_distance)
            records.append(_micrograph_record(stem, params, mic))
            ctfs.append(mic.ctf)
            if params.particles_per_micrograph and len(truth) < 0.9 * params.particles_per_micrograph:
                warn(f"{stem}: only {len(truth)} of {params.particles_per_micrograph} particles fit "
                     "(minimum distance and contamination)")
            del mic  # frees its image-sized arrays before the next micrograph allocates its own
            bar.advance(task)
    return records, truths, ctfs


def _case_summary(params: SimulationParams, records: list[dict], stems: list[str], labels: dict) -> dict:
    """The totals case.json records once every micrograph is written."""
    n_particles = sum(r["n_particles"] for r in records)
    n_labels = sum(r["n_labels"] for r in records)
    return {
        "complete": True,
        "n_micrographs": params.n_micrographs,
        "n_particles": n_particles,
        "n_labels": n_labels,
        "label_fraction_actual": round(n_labels / n_particles, 4) if n_particles else 0.0,
        "labelled_micrographs": [stems[i] for i in sorted(labels)],
        "labels": {
            "sigma_px": round(LABEL_SIGMA_FRACTION * params.diameter_px, 4),
            "error_clip_sigmas": LABEL_ERROR_CLIP,
            "selection": "isolated particles first (neighbour >= 1.3 D, >= 1 D from ice/carbon, >= 0.75 D from "
                         "junk and edges), relaxed in tiers when short",
        },
        "counts": {key: sum(r[key] for r in records) for key in
                   ("n_particles", "n_partial_outside", "n_junk", "n_contamination", "n_labels")}
                  | {"n_carbon_micrographs": sum(r["carbon"] for r in records)},
        "micrographs": records,
    }
