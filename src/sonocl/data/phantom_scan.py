"""How a phantom lung-ultrasound video is drawn (`sonocl.data.phantom` makes the videos and data sets from it).

Anatomy is drawn once, in probe coordinates (depth along the beam × position across the sector): the pleura is a
line at one depth, A-lines its copies at multiples of that depth, B-lines and rib shadows run along beams. Two tissue
layers, the chest wall and the lung beneath it, move separately (probe drift moves both, breathing slides the lung
under the wall) with a lookup per pixel; each frame is sampled straight into the convex fan of a square frame (scan
conversion), and static overlay marks surround it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

# Chest zones change the geometry slightly, so that anatomy labels carry visual signal:
# pleura depth (share of the imaged depth), rib spacing (in half-sector units), rib offset by side.
_ZONE_PLEURA_DEPTH = {"1": 0.25, "2": 0.21, "3": 0.17}
_ZONE_RIB_SPACING = {"1": 1.0, "2": 1.15, "3": 1.3}
_SIDE_RIB_SHIFT = {"R": 0.12, "L": -0.12}

# Tissue layers span u in [-2, 2), twice the sector's [-1, 1], because drift and sliding move tissue
# into view; u is measured in half-sector widths, depth in shares of the imaged depth.
_TISSUE_REACH = 2.0
_LOG_COMPRESSION = np.float32(6.0)


@dataclass(frozen=True)
class Patient:
    """What stays the same across one patient's videos: body habitus and the scanner used."""

    chest_wall: float  # scales the pleura depth
    attenuation: float
    gain: float
    half_angle_deg: float
    probe_radius: float  # share of the frame size


def sample_patient(rng: np.random.Generator) -> Patient:
    return Patient(
        chest_wall=rng.uniform(0.85, 1.2),
        attenuation=rng.uniform(0.3, 1.0),
        gain=rng.uniform(1.0, 1.4),
        half_angle_deg=rng.uniform(25.0, 33.0),
        probe_radius=rng.uniform(0.18, 0.3),
    )


def sample_findings(label: str, rng: np.random.Generator) -> dict[str, bool]:
    """Which patterns a video of ``label`` shows: the typical ones, plus the occasional atypical one."""
    if label == "regular":
        return {"a_lines": True, "b_lines": rng.random() < 0.15, "consolidation": False, "effusion": False}
    if label == "covid":
        return {"a_lines": rng.random() < 0.25, "b_lines": True, "consolidation": rng.random() < 0.3, "effusion": False}
    return {
        "a_lines": rng.random() < 0.3,
        "b_lines": rng.random() < 0.3,
        "consolidation": True,
        "effusion": rng.random() < 0.5,
    }


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 below ``-width/2``, 1 above ``width/2``: a soft step that avoids aliased edges."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rayleigh-distributed speckle of mean 1, grains a pixel or two across as a real beam's are."""
    real = gaussian_filter(rng.standard_normal(shape), (1.0, 1.8))
    imag = gaussian_filter(rng.standard_normal(shape), (1.0, 1.8))
    amplitude = np.hypot(real, imag)
    return (amplitude / amplitude.mean()).astype(np.float32)


@dataclass(frozen=True)
class _Tissue:
    """One video's anatomy as flat ``(n * m,)`` images over (depth row, column) grids, plus per-frame B-lines.

    Chest-wall layer (moves with the probe): ``above`` is the image above the pleura (fluid included),
    ``lung_weight`` where the lung shows through, ``pleura`` the pleural line's shape, ``b_line_onset``
    where B-lines show, ``shadow`` the rib shadows' attenuation. Lung layer (also slides with breathing):
    ``lung`` its image, ``a_line_weight`` where A-lines show. ``a_lines`` lies in probe coordinates:
    reverberations stay put while tissue moves. ``pleura_brightness`` (m,) and ``b_lines`` (T, m) are
    indexed by lung column.
    """

    rows: int
    columns: int
    above: np.ndarray
    lung_weight: np.ndarray
    pleura: np.ndarray
    b_line_onset: np.ndarray
    shadow: np.ndarray
    lung: np.ndarray
    a_line_weight: np.ndarray
    a_lines: np.ndarray
    pleura_brightness: np.ndarray
    b_lines: np.ndarray


@dataclass(frozen=True)
class _Canvas:
    """What every feature is drawn over: the tissue grid's pixel centres, ``depth`` (n, 1) in shares of the
    imaged depth and ``u`` (1, m) in half-sector widths, and each layer's speckle (n, m)."""

    depth: np.ndarray
    u: np.ndarray
    wall_speckle: np.ndarray
    lung_speckle: np.ndarray

    def smooth_noise(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """A (1, m) random profile across the sector, zero mean, unit deviation, varying over ``scale`` in u."""
        m = self.u.size
        columns_per_u = m / (2 * _TISSUE_REACH)
        profile = gaussian_filter1d(rng.standard_normal(m), scale * columns_per_u, mode="wrap")
        return ((profile - profile.mean()) / profile.std()).astype(np.float32)[None, :]


@dataclass(frozen=True)
class _Pleura:
    """The pleural line: its set ``depth``, the depth it actually lies at across the sector ``at`` (1, m), its
    ``width`` and its ``brightness`` (1, m)."""

    depth: float
    at: np.ndarray
    width: float
    brightness: np.ndarray


def render_tissue(
    label: str,
    anatomy: str,
    patient: Patient,
    findings: dict[str, bool],
    time: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> _Tissue:
    """One video's anatomy, drawn feature by feature; the order of the draws from ``rng`` is part of every video."""
    side, zone = anatomy[0], anatomy[1]
    m = 2 * n
    canvas = _Canvas(
        depth=((np.arange(n, dtype=np.float32) + 0.5) / n)[:, None],
        u=((np.arange(m, dtype=np.float32) + 0.5) / m * 2 * _TISSUE_REACH - _TISSUE_REACH)[None, :],
        wall_speckle=_speckle(rng, (n, m)),
        lung_speckle=_speckle(rng, (n, m)),
    )
    pleura = _pleura(label, zone, patient, canvas, rng)
    below_pleura = canvas.depth - pleura.at
    lung_weight = _ramp(below_pleura, 0.008)
    above = _chest_wall(pleura.depth, canvas, rng) * (1 - lung_weight)

    # Lung: air shows only a dim reverberation haze.
    lung = 0.09 * np.exp(-np.maximum(below_pleura, 0) / 0.5) * canvas.lung_speckle
    a_line_weight = canvas.lung_speckle.copy()

    # How far below the pleura a consolidation starts: under the fluid, if any.
    consolidation_top: np.ndarray | np.float32 = np.float32(0.004)
    if findings["effusion"]:
        fluid, consolidation_top = _effusion(canvas, below_pleura, rng)
        above = above + fluid * 0.005 * canvas.wall_speckle
        lung_weight = lung_weight * (1 - fluid)
    if findings["consolidation"]:
        lung, a_line_share = _consolidate(lung, label, canvas, below_pleura, consolidation_top, rng)
        a_line_weight *= a_line_share

    a_lines = _a_lines(label, canvas, pleura, rng) if findings["a_lines"] else np.zeros((n, m), dtype=np.float32)
    b_lines = _b_lines(label, canvas, time, rng) if findings["b_lines"] else np.zeros((time.size, m), dtype=np.float32)
    b_line_onset = _ramp(below_pleura - 0.01, 0.02) * (0.7 + 0.3 * canvas.wall_speckle)

    shadow, rib_surface = _ribs(side, zone, pleura.depth, canvas, rng)
    above = above + rib_surface

    return _Tissue(
        rows=n,
        columns=m,
        above=above.ravel(),
        lung_weight=lung_weight.ravel(),
        pleura=np.exp(-((below_pleura / pleura.width) ** 2)).ravel(),
        b_line_onset=b_line_onset.ravel(),
        shadow=shadow.ravel(),
        lung=lung.ravel(),
        a_line_weight=a_line_weight.ravel(),
        a_lines=a_lines.ravel(),
        pleura_brightness=pleura.brightness.ravel(),
        b_lines=b_lines,
    )


def _pleura(label: str, zone: str, patient: Patient, canvas: _Canvas, rng: np.random.Generator) -> _Pleura:
    """Pleural line: smooth and bright when healthy; irregular, thick and broken with COVID-19."""
    depth = _ZONE_PLEURA_DEPTH[zone] * patient.chest_wall / rng.uniform(0.85, 1.15)  # random depth setting
    if label == "covid":
        at = depth + rng.uniform(0.008, 0.016) * canvas.smooth_noise(rng, 0.05)
        width = rng.uniform(0.011, 0.017)
        brightness = np.clip(0.55 + 0.45 * canvas.smooth_noise(rng, 0.04), 0.1, 1.0)
    else:
        at = depth + 0.002 * canvas.smooth_noise(rng, 0.3)
        width = rng.uniform(0.007, 0.01)
        brightness = np.clip(0.9 + 0.15 * canvas.smooth_noise(rng, 0.02), 0.6, 1.1)
    return _Pleura(depth, at, width, brightness)


def _chest_wall(pleura_depth: float, canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Chest wall, (n, m): subcutaneous fat, then muscle with bright fascia lines above ``pleura_depth``."""
    depth = canvas.depth
    wall_profile = np.where(depth < 0.04, 0.08, 0.13).astype(np.float32)
    for _ in range(rng.integers(2, 5)):
        at = rng.uniform(0.03, pleura_depth - 0.04)
        wall_profile += rng.uniform(0.1, 0.25) * np.exp(-(((depth - at) / rng.uniform(0.005, 0.01)) ** 2))
    return wall_profile * canvas.wall_speckle


def _effusion(canvas: _Canvas, below_pleura: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Effusion: anechoic fluid between the pleura and the (consolidated) lung. Where the fluid lies, (n, m), and
    how far below the pleura the lung's consolidation starts, (1, m)."""
    u = canvas.u
    thickness = rng.uniform(0.12, 0.25) * (1 + 0.25 * canvas.smooth_noise(rng, 0.4))
    start, stop = sorted(rng.uniform(-0.9, 0.9, 2)) if rng.random() < 0.3 else (-_TISSUE_REACH, _TISSUE_REACH)
    envelope = _ramp(u - start, 0.1) * _ramp(stop - u, 0.1)
    fluid = envelope * _ramp(below_pleura - 0.006, 0.008) * _ramp(thickness - below_pleura, 0.02)
    return fluid, thickness * envelope + 0.004


def _consolidate(
    lung: np.ndarray,
    label: str,
    canvas: _Canvas,
    below_pleura: np.ndarray,
    top: np.ndarray | np.float32,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Consolidation: hypoechoic tissue-like lung with air bronchograms and a shredded deep border, from ``top``
    below the pleura. The ``lung`` image with it drawn in, and the share of the A-lines that still shows."""
    u = canvas.u
    if label == "pneumonia":
        centre, half_width, extent = rng.uniform(-0.5, 0.5), rng.uniform(0.35, 0.9), rng.uniform(0.2, 0.45)
    else:  # a small subpleural consolidation
        centre, half_width, extent = rng.uniform(-0.6, 0.6), rng.uniform(0.06, 0.14), rng.uniform(0.04, 0.09)
    envelope = _ramp(half_width - np.abs(u - centre), 0.08)
    lens = np.sqrt(np.clip(1 - ((u - centre) / half_width) ** 2, 0, 1))  # deepest in the middle
    deep_border = top + extent * lens * (1 + 0.25 * canvas.smooth_noise(rng, 0.06))
    solid = envelope * _ramp(below_pleura - top, 0.015) * _ramp(deep_border - below_pleura, 0.02)
    dots = gaussian_filter((rng.random(lung.shape) > 0.99).astype(np.float32), (1.0, 0.6))
    bronchograms = np.minimum(dots / dots.max() * 1.8, 1.0)
    shred_line = 0.3 * envelope * np.exp(-(((below_pleura - deep_border) / 0.012) ** 2)) * canvas.lung_speckle
    lung = lung * (1 - solid) + (0.17 * canvas.wall_speckle + 0.7 * bronchograms) * solid + shred_line
    return lung, (1 - envelope) * (1 - solid)


def _a_lines(label: str, canvas: _Canvas, pleura: _Pleura, rng: np.random.Generator) -> np.ndarray:
    """A-lines, (n, m): reverberations of the pleura at multiples of its depth from the probe face."""
    a_lines = np.zeros(canvas.wall_speckle.shape, dtype=np.float32)
    amplitude = rng.uniform(0.25, 0.45) if label == "regular" else rng.uniform(0.06, 0.14)
    lateral = np.clip(0.75 + 0.3 * canvas.smooth_noise(rng, 0.15), 0.3, 1.1)
    for k in range(2, 6):
        line_width = pleura.width * (1 + 0.3 * k)
        a_lines += (
            (amplitude * 0.7 ** (k - 2)) * lateral * np.exp(-(((canvas.depth - k * pleura.at) / line_width) ** 2))
        )
    return a_lines


def _b_lines(label: str, canvas: _Canvas, time: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """B-lines, (T, m): comet tails along beams from the pleura to the bottom; they move with the lung and flicker."""
    b_lines = np.zeros((time.size, canvas.u.size), dtype=np.float32)
    count, strength = (rng.integers(2, 6), (0.35, 0.7)) if label == "covid" else (1, (0.15, 0.3))
    for _ in range(count):
        flicker = 0.65 + 0.35 * np.sin(2 * np.pi * rng.uniform(0.4, 1.5) * time + rng.uniform(0, 2 * np.pi))
        width = rng.uniform(0.025, 0.06) if rng.random() < 0.8 else rng.uniform(0.1, 0.18)  # sometimes confluent
        b_lines += (rng.uniform(*strength) * flicker)[:, None] * np.exp(
            -(((canvas.u - rng.uniform(-0.75, 0.75)) / width) ** 2)
        )
    return b_lines


def _ribs(
    side: str, zone: str, pleura_depth: float, canvas: _Canvas, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Ribs: a bright rounded surface just above the pleura and an acoustic shadow along the beams below it.
    The shadow's attenuation and the surfaces' echo, both (n, m)."""
    depth, u = canvas.depth, canvas.u
    rib_spacing = _ZONE_RIB_SPACING[zone] * rng.uniform(0.92, 1.08)
    rib_half_width = rng.uniform(0.12, 0.17)
    first_rib = _SIDE_RIB_SHIFT[side] + rng.uniform(-0.1, 0.1) - rib_spacing / 2
    rib = np.zeros_like(u)
    rib_top = np.zeros_like(u)
    for centre in first_rib + rib_spacing * np.arange(-2, 4):
        offset = (u - centre) / rib_half_width
        this_rib = _ramp(1 - np.abs(offset), 0.15)
        rib_top = np.where(this_rib > 0, pleura_depth - 0.015 - 0.03 * np.sqrt(np.clip(1 - offset**2, 0, 1)), rib_top)
        rib = np.maximum(rib, this_rib)
    shadow = 1 - 0.93 * rib * _ramp(depth - rib_top - 0.012, 0.01)
    return shadow, 0.5 * rib * np.exp(-(((depth - rib_top) / 0.01) ** 2)) * canvas.wall_speckle


@dataclass(frozen=True)
class _Motion:
    """Per-frame displacement of the two tissue layers, in (row, column) steps of the tissue grids."""

    wall_rows: np.ndarray
    wall_columns: np.ndarray
    lung_rows: np.ndarray
    lung_columns: np.ndarray


def sample_motion(label: str, time: np.ndarray, n: int, rng: np.random.Generator) -> _Motion:
    """Breathing (the lung slides under the chest wall, strongly only when healthy) and slow probe drift."""
    breath = np.sin(2 * np.pi * time / rng.uniform(3.0, 5.0) + rng.uniform(0, 2 * np.pi))
    sliding = rng.uniform(0.06, 0.12) if label == "regular" else rng.uniform(0.0, 0.035)
    drift_u = rng.uniform(-0.04, 0.04) * time + 0.015 * np.sin(2 * np.pi * time / rng.uniform(2.0, 6.0))
    drift_depth = 0.004 * breath + rng.uniform(-0.01, 0.01) * time
    columns_per_u = n / _TISSUE_REACH

    def steps(shift: np.ndarray, per_unit: float) -> np.ndarray:
        return np.rint(shift * per_unit).astype(np.int64)

    return _Motion(
        wall_rows=steps(drift_depth, n),
        wall_columns=steps(drift_u, columns_per_u),
        lung_rows=steps(drift_depth + 0.006 * breath, n),
        lung_columns=steps(drift_u + sliding * breath, columns_per_u),
    )


@dataclass(frozen=True)
class _Fan:
    """Convex-probe sector in frame pixels: the apex lies above the frame, the probe face is an arc."""

    centre_x: float
    apex_y: float
    inner_radius: float
    outer_radius: float
    half_angle: float

    def polar(self, size: int, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: depth share, position across the sector in [-1, 1], inside-the-fan mask grown by ``margin`` pixels."""
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        radius = np.hypot(x - self.centre_x, y - self.apex_y)
        depth = (radius - self.inner_radius) / (self.outer_radius - self.inner_radius)
        across = np.arctan2(x - self.centre_x, y - self.apex_y) / self.half_angle
        inside = (
            (radius >= self.inner_radius - margin)
            & (radius < self.outer_radius + margin)
            & (np.abs(across) < 1 + margin / np.maximum(radius, 1) / self.half_angle)
        )
        return depth, across, inside


def sample_fan(patient: Patient, size: int, rng: np.random.Generator) -> _Fan:
    half_angle = math.radians(patient.half_angle_deg)
    inner_radius = patient.probe_radius * size
    apex_y = rng.uniform(0.06, 0.11) * size - inner_radius
    # As deep as the frame allows, but narrow enough to leave side margins for the overlay marks.
    outer_radius = min(0.97 * size - apex_y, 0.41 * size / math.sin(half_angle))
    centre_x = size / 2 + rng.uniform(-0.02, 0.02) * size
    return _Fan(centre_x, apex_y, inner_radius, outer_radius, half_angle)


def overlay(fan: _Fan, size: int, rng: np.random.Generator) -> np.ndarray:
    """Static scanner marks around the fan: text-like glyphs, a depth scale, a grey-map bar, a probe marker."""
    marks = np.zeros((size, size), dtype=np.uint8)

    def box(top: float, left: float, height: float, width: float, value: int) -> None:
        top_px, left_px = int(top * size), int(left * size)
        marks[top_px : top_px + max(1, round(height * size)), left_px : left_px + max(1, round(width * size))] = value

    glyph_h, glyph_w = 0.035, 0.018
    for row_top, row_left, glyphs in (
        (0.02, 0.02, 6),
        (0.07, 0.02, 4),
        (0.02, 0.72, 5),
        (0.07, 0.78, 3),
        (0.93, 0.03, 5),
    ):
        for k in range(glyphs):
            if rng.random() < 0.85:  # a gap now and then, like spaces between words
                box(
                    row_top,
                    row_left + k * 1.6 * glyph_w,
                    glyph_h,
                    glyph_w * rng.uniform(0.6, 1.0),
                    int(rng.integers(170, 256)),
                )
    scale_x = 0.955
    top, bottom = (fan.apex_y + fan.inner_radius) / size, (fan.apex_y + fan.outer_radius) / size
    box(top, scale_x, bottom - top, 0.008, 200)
    for tick in np.linspace(top, bottom, 6):
        box(tick, scale_x - 0.025, 0.008, 0.025, 220)
    bar_top = 0.35
    for step, value in enumerate(np.linspace(30, 235, 24)):
        box(bar_top + step * 0.0125, 0.02, 0.0125, 0.03, int(value))
    box(top, fan.centre_x / size - fan.inner_radius * math.sin(fan.half_angle) / size - 0.06, 0.025, 0.025, 255)
    _, _, near_fan = fan.polar(size, margin=2.0)
    marks[near_fan] = 0
    return marks


def scan(
    tissue: _Tissue, motion: _Motion, fan: _Fan, patient: Patient, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Frame pixels inside the fan, (T, P) uint8, and the fan mask: each pixel looks up both tissue layers where
    this frame's motion has moved them, then goes through the imaging chain."""
    depth, across, inside = fan.polar(size)
    depth, across = depth[inside], across[inside]
    n, m = tissue.rows, tissue.columns
    rows = np.clip((depth * n).astype(np.int64), 0, n - 1)
    columns = ((across + _TISSUE_REACH) * n / _TISSUE_REACH).astype(np.int64)

    def lookup(row_shift: np.ndarray, column_shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tissue_rows = np.clip(rows - row_shift[:, None], 0, n - 1)
        tissue_columns = np.clip(columns - column_shift[:, None], 0, m - 1)
        return tissue_rows * m + tissue_columns, tissue_columns

    wall_at, _ = lookup(motion.wall_rows, motion.wall_columns)
    lung_at, lung_columns = lookup(motion.lung_rows, motion.lung_columns)
    b_lines = tissue.b_lines[np.arange(len(tissue.b_lines))[:, None], lung_columns]
    a_lines = tissue.a_lines[rows * m + columns]
    lung = (
        tissue.lung[lung_at]
        + a_lines * tissue.a_line_weight[lung_at] * np.clip(1 - 2 * b_lines, 0, 1)  # B-lines erase A-lines
        + b_lines * tissue.b_line_onset[wall_at]
    )
    image = tissue.above[wall_at] + tissue.lung_weight[wall_at] * lung
    image += tissue.pleura[wall_at] * tissue.pleura_brightness[lung_columns]
    image *= tissue.shadow[wall_at]

    # Imaging chain: depth attenuation, weaker sector edges, gain, probe ring-down, electronic noise.
    gain = (
        patient.gain * rng.uniform(0.85, 1.15) * np.exp(-patient.attenuation * depth) * (1 - 0.3 * np.abs(across) ** 6)
    )
    image = image * gain + 0.2 * np.exp(-depth / 0.015)
    image += 0.012 * rng.standard_normal(image.shape, dtype=np.float32)
    # Log compression, as scanners display echo amplitude.
    display = np.log1p(_LOG_COMPRESSION * np.clip(image, 0.0, 1.0)) / np.log1p(_LOG_COMPRESSION)
    return (display * 255).astype(np.uint8), inside
