"""The synthetic video world the bundled model learns: procedural clips with
exact captions.

Everything is drawn analytically per pixel, in torch, batched over clips and
frames, so that batches are made on the training device as fast as the model
eats them. Each pixel's screen position goes through the frame's camera
(pan, tilt, zoom, roll) into world coordinates, and the scene and the subject
are functions of world coordinates: camera moves are real moves over an
unbounded scene, not crops of a picture.

Camera names follow Motif's `--camera`: they say how the picture content
moves (pan-left shifts the content left, tilt-up shifts it up, roll-cw turns
it clockwise).

A clip is described by integer choices (subject, colour, action, scene, time
of day, camera, style, plain background colour) and a few continuous ones
(start position, size, camera start, texture seed). `sample_params` draws
them, `caption` words them and `render` draws them.
"""

import math
import random

import torch

COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (1.00, 0.90, 0.12),
    "green": (0.15, 0.78, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "purple": (0.60, 0.20, 0.82),
    "pink": (1.00, 0.52, 0.78),
    "white": (0.97, 0.97, 0.97),
}
COLOUR_NAMES = list(COLOURS)
# Plain backgrounds may also be black or grey.
BACKGROUNDS = dict(COLOURS, black=(0.05, 0.05, 0.06), grey=(0.50, 0.50, 0.52))
BACKGROUND_NAMES = list(BACKGROUNDS)

SUBJECTS = ["ball", "cube", "star", "bird", "fish", "car", "tree", "diamond"]
ACTIONS = ["left", "right", "up", "down", "bouncing", "spinning", "growing", "shrinking", "falling"]
SCENES = ["sky", "grass", "sea", "snow", "city", "plain"]
TIMES = ["day", "sunset", "night"]
CAMERAS = ["static", "pan-left", "pan-right", "tilt-up", "tilt-down", "zoom-in", "zoom-out", "roll-cw", "roll-ccw"]
STYLES = ["flat", "neon", "pixel", "painterly"]

# Which way the subject itself moves on screen (x, y with y up) for the
# actions that have a direction.
ACTION_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, 1), "down": (0, -1), "falling": (0, -1)}

ACTION_PHRASES = {
    "left": ["moving left", "moving to the left", "going left"],
    "right": ["moving right", "moving to the right", "going right"],
    "up": ["moving up", "rising", "floating up"],
    "down": ["moving down", "sinking", "going down"],
    "bouncing": ["bouncing", "bouncing up and down"],
    "spinning": ["spinning", "rotating", "turning around"],
    "growing": ["growing", "getting bigger"],
    "shrinking": ["shrinking", "getting smaller"],
    "falling": ["falling", "dropping", "falling down"],
}
SCENE_PHRASES = {
    "sky": {"day": ["in the sky", "in the blue sky", "across the sky"],
            "sunset": ["in the sky at sunset", "in a sunset sky", "across the sunset sky"],
            "night": ["in the night sky", "in the sky at night", "under the stars"]},
    "grass": ["on grass", "on a grass field", "in a meadow"],
    "sea": ["over the sea", "above the ocean", "by the sea"],
    "snow": ["in the snow", "on a snowy field", "in a snowy landscape"],
    "city": ["in the city", "over a city skyline", "above the city"],
    "plain": ["on a plain {bg} background", "on a {bg} background", "on plain {bg}"],
}
TIME_PHRASES = {"day": ["", "", " on a sunny day", " during the day"],
                "sunset": [" at sunset", " at dusk"],
                "night": [" at night", " at night under the stars"]}
CAMERA_PHRASES = {
    "static": ["", "", "static camera", "still camera"],
    "pan-left": ["camera pans left", "panning left", "pan left"],
    "pan-right": ["camera pans right", "panning right", "pan right"],
    "tilt-up": ["camera tilts up", "tilting up", "tilt up"],
    "tilt-down": ["camera tilts down", "tilting down", "tilt down"],
    "zoom-in": ["camera zooms in", "zooming in", "zoom in"],
    "zoom-out": ["camera zooms out", "zooming out", "zoom out"],
    "roll-cw": ["camera rolls clockwise", "rolling clockwise", "roll clockwise"],
    "roll-ccw": ["camera rolls counterclockwise", "rolling anticlockwise", "roll counterclockwise"],
}
# `{p}` is the rest of the caption. The last form of each is the matching
# preset of assets/styles.json, so `--style` means something to this model.
STYLE_FORMS = {
    "flat": ["{p}", "{p}", "{p}, flat colors", "flat illustration of {p}",
             "anime key visual of {p}, clean line art, vibrant colors, studio anime style"],
    "neon": ["{p}, neon", "{p}, neon outlines, glowing", "neon glow art of {p}",
             "{p}, neon outlines, glowing, synthwave colors, dark background"],
    "pixel": ["{p}, pixel art", "pixel art of {p}", "{p}, 8-bit pixel art",
              "pixel art of {p}, 16-bit, retro game, limited palette, crisp pixels"],
    "painterly": ["{p}, watercolor", "{p}, painterly, textured", "watercolor painting of {p}",
                  "watercolor painting of {p}, soft washes, paper texture, painterly"],
}
# The styles presets' negative prompts: trained as unconditional captions,
# so that classifier-free guidance against them behaves like guidance
# against the empty prompt.
UNCONDITIONAL = [
    "", "cartoon, drawing, lowres, blurry, deformed", "photo, realistic, 3d render, lowres, blurry",
    "photo, 3d render, sharp edges, lowres", "photo, realistic, drawing, lowres",
    "photo, realistic, blurry, smooth gradients", "photo, drawing, sketch, lowres, noisy",
    "daylight, washed out, lowres", "color, photo, 3d render, lowres",
]

# Camera amplitudes over one clip (screen width = 2 world units at zoom 1).
PAN = 0.7
ZOOM = math.log(1.7)
ROLL = math.radians(45)
HORIZON = -0.25


def held_out_triples():
    """(colour, subject, action) combinations never shown in training: 12,
    8 of them with a direction (for the direction metric)."""
    rng = random.Random(1234)
    directional = ["left", "right", "up", "down", "falling"]
    other = [a for a in ACTIONS if a not in directional]
    triples = []
    while len(triples) < 12:
        action = rng.choice(directional if len(triples) < 8 else other)
        t = (rng.choice(COLOUR_NAMES), rng.choice(SUBJECTS), action)
        # The README's example ("a yellow star spinning ...") stays trained.
        if t not in triples and t != ("yellow", "star", "spinning"):
            triples.append(t)
    return triples


HELD_OUT = set(held_out_triples())


def held_out_split():
    """The 48 evaluation clips: parameter dicts with a fixed seed each.
    The first 24 keep the camera still (colour and direction are measured
    there), the last 24 move it over textured scenes (camera measured)."""
    rng = random.Random(4321)
    triples = held_out_triples()
    moving = CAMERAS[1:]
    items = []
    for i in range(48):
        colour, subject, action = triples[i % 12]
        camera = "static" if i < 24 else moving[i % 8]
        items.append(dict(
            colour=colour, subject=subject, action=action,
            scene=rng.choice(SCENES[:5]), time=rng.choice(TIMES), camera=camera,
            style=rng.choice(STYLES), background="grey", seed=1000 + i))
    return items


class Recipe:
    """What the training clips and captions are drawn from: relative weights
    of the actions and camera moves (uniform when None) and the share of
    captions in the canonical phrasing (the one eval.py prompts with)
    instead of a random one. The defaults are the recipe the shipped model
    was trained on."""

    def __init__(self, action_weights=None, camera_weights=None, canonical_share=0.0):
        self.action_weights = _weights("action", action_weights, ACTIONS)
        self.camera_weights = _weights("camera", camera_weights, CAMERAS)
        if not 0.0 <= canonical_share <= 1.0:
            raise ValueError(f"canonical caption share must be within [0, 1], found {canonical_share}")
        self.canonical_share = canonical_share

    def describe(self):
        return dict(action_weights=self.action_weights and dict(zip(ACTIONS, self.action_weights)),
                    camera_weights=self.camera_weights and dict(zip(CAMERAS, self.camera_weights)),
                    canonical_share=self.canonical_share)


def _weights(what, weights, names):
    """None, or a {name: weight} dict (names left out weigh 1), as a list."""
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{what} weights: unknown {what} {unknown}; expected some of {names}")
    out = [float(weights.get(n, 1.0)) for n in names]
    if any(w < 0 for w in out) or sum(out) <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum, found {dict(zip(names, out))}")
    return out


def parse_weights(text):
    """'left=2,right=2' -> {'left': 2.0, 'right': 2.0} (for command lines)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"weight {part!r}: expected NAME=NUMBER") from None
        if not sep:
            raise ValueError(f"weight {part!r}: expected NAME=NUMBER")
    return out


def _pick(rng, names, weights):
    # Uniform draws keep rng.choice so that the default recipe draws the
    # same clips as before recipes existed.
    return rng.choice(names) if weights is None else rng.choices(names, weights)[0]


def sample_choices(rng, allow_held_out=False, recipe=None):
    """One clip's discrete choices (held-out triples redrawn), uniform
    unless `recipe` weighs actions or camera moves."""
    aw = recipe.action_weights if recipe else None
    cw = recipe.camera_weights if recipe else None
    while True:
        c = dict(colour=rng.choice(COLOUR_NAMES), subject=rng.choice(SUBJECTS), action=_pick(rng, ACTIONS, aw))
        if allow_held_out or (c["colour"], c["subject"], c["action"]) not in HELD_OUT:
            break
    c["scene"] = rng.choice(SCENES)
    c["time"] = rng.choice(TIMES)
    c["style"] = rng.choice(STYLES)
    # A plain background shows no camera move, so it keeps the camera still.
    c["camera"] = "static" if c["scene"] == "plain" else _pick(rng, CAMERAS, cw)
    bgs = [b for b in BACKGROUND_NAMES if b != c["colour"]]
    c["background"] = rng.choice(bgs)
    return c


def caption(c, rng=None):
    """Words one clip's choices; `rng` None gives the canonical phrasing
    (first form of each), else a random one."""
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    scene = SCENE_PHRASES[c["scene"]]
    if c["scene"] == "sky":
        where = pick(scene[c["time"]])
    elif c["scene"] == "plain":
        where = pick(scene).format(bg=c["background"])
    else:
        where = pick(scene) + (pick(TIME_PHRASES[c["time"]]) if rng is not None else
                               {"day": "", "sunset": " at sunset", "night": " at night"}[c["time"]])
    article = "an" if c["colour"][0] in "aeiou" else "a"
    p = f"{article} {c['colour']} {c['subject']} {pick(ACTION_PHRASES[c['action']])} {where}"
    cam = pick(CAMERA_PHRASES[c["camera"]]) if rng is not None else (
        "" if c["camera"] == "static" else CAMERA_PHRASES[c["camera"]][0])
    if cam:
        p += f", {cam}"
    if rng is None:
        form = {"flat": "{p}", "neon": "{p}, neon", "pixel": "{p}, pixel art", "painterly": "{p}, watercolor"}[c["style"]]
    else:
        form = pick(STYLE_FORMS[c["style"]])
    return form.format(p=p)


def choices_to_tensors(items, device, gen, pin=False):
    """Integer and continuous parameters for `render`, one row per clip.
    Drawn on the CPU (the same values on every device); with `pin` they
    go to a CUDA device from pinned memory without blocking, so that the
    host never waits for the GPU to catch up."""
    n = len(items)

    def idx(key, names):
        return torch.tensor([names.index(it[key]) for it in items])

    u = lambda: torch.rand(n, generator=gen, device="cpu")  # noqa: E731
    p = dict(
        colour=idx("colour", COLOUR_NAMES), subject=idx("subject", SUBJECTS), action=idx("action", ACTIONS),
        scene=idx("scene", SCENES), time=idx("time", TIMES), camera=idx("camera", CAMERAS),
        style=idx("style", STYLES), background=idx("background", BACKGROUND_NAMES),
        jx=u() * 2 - 1, jy=u() * 2 - 1, size=0.30 + 0.12 * u(), cam_x=u() * 8 - 4, seed=u() * 100,
        spin=torch.where(u() < 0.5, -1.0, 1.0), phase=u())
    return to_device(p, device, pin)


def to_device(p, device, pin=False):
    pin = pin and str(device).startswith("cuda")
    return {k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) for k, v in p.items()}


# --- drawing helpers -------------------------------------------------------

def _hash(i, j, seed):
    """A pseudo-random value in [0, 1) per integer lattice point."""
    h = torch.sin(i * 127.1 + j * 311.7 + seed * 74.7) * 43758.5453
    return h - torch.floor(h)


def _noise(x, y, seed):
    """Smooth value noise in [0, 1), one lattice cell per unit."""
    i, j = torch.floor(x), torch.floor(y)
    fx, fy = x - i, y - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(i, j, seed), _hash(i + 1, j, seed)
    c, d = _hash(i, j + 1, seed), _hash(i + 1, j + 1, seed)
    return (a + (b - a) * fx) * (1 - fy) + (c + (d - c) * fx) * fy


def _mix(a, b, t):
    return a + (b - a) * t


_RGB = {}


def _rgb(values, device):
    # Cached per device: a fresh tensor would be a host-to-device copy, and
    # one that waits for the GPU, dozens of times per render.
    key = (tuple(values) if not isinstance(values[0], (list, tuple)) else tuple(map(tuple, values)), str(device))
    if key not in _RGB:
        _RGB[key] = torch.tensor(values, device=device, dtype=torch.float32)
    return _RGB[key]


def _col(table, index):
    """[n, 3] colours -> [n, 1, 1, 1, 3] per clip."""
    return table[index][:, None, None, None, :]


def _ellipse(qx, qy, cx, cy, rx, ry):
    return (torch.sqrt(((qx - cx) / rx) ** 2 + ((qy - cy) / ry) ** 2) - 1) * min(rx, ry)


def _box(qx, qy, cx, cy, hx, hy):
    return torch.maximum((qx - cx).abs() - hx, (qy - cy).abs() - hy)


def _subject_sdf(kind, qx, qy, t, flip):
    """Signed distance (local units, subject radius ~1) of the coloured part
    and of the dark detail part (wheels, trunk, eye), for one subject kind."""
    big = torch.full_like(qx, 10.0)
    if kind == "ball":
        return torch.sqrt(qx * qx + qy * qy) - 1, big
    if kind == "cube":
        return _box(qx, qy, 0, 0, 0.82, 0.82), big
    if kind == "diamond":
        return (qx.abs() * 1.25 + qy.abs() * 0.85 - 1.0) * 0.7, big
    if kind == "star":
        r = torch.sqrt(qx * qx + qy * qy)
        a = torch.atan2(qx, qy)
        f = torch.remainder(a * 5 / (2 * math.pi), 1.0)
        tri = (f - 0.5).abs() * 2  # 1 at the points, 0 between
        return (r - (0.42 + 0.62 * tri ** 1.6)) * 0.8, big
    x = qx * flip
    if kind == "bird":
        flap = torch.sin(t * 2 * math.pi * 3) * 0.35
        body = _ellipse(x, qy, 0.0, 0.0, 0.75, 0.32)
        head = torch.sqrt((x - 0.7) ** 2 + (qy - 0.18) ** 2) - 0.26
        wing = _ellipse(x, qy - (0.35 + flap) * (1 - (x + 0.1).abs()), -0.1, 0.3, 0.45, 0.22)
        eye = torch.sqrt((x - 0.78) ** 2 + (qy - 0.24) ** 2) - 0.07
        return torch.minimum(torch.minimum(body, head), wing), eye
    if kind == "fish":
        body = _ellipse(x, qy, 0.15, 0.0, 0.8, 0.45)
        tail = torch.maximum(qy.abs() + x + 0.45, -x - 1.15)
        eye = torch.sqrt((x - 0.6) ** 2 + (qy - 0.1) ** 2) - 0.08
        return torch.minimum(body, tail * 0.7), eye
    if kind == "car":
        body = _box(x, qy, 0, -0.05, 1.0, 0.28)
        cabin = _box(x, qy, -0.1, 0.38, 0.5, 0.22)
        wheels = torch.minimum(torch.sqrt((x - 0.55) ** 2 + (qy + 0.35) ** 2),
                               torch.sqrt((x + 0.55) ** 2 + (qy + 0.35) ** 2)) - 0.26
        return torch.minimum(body, cabin), wheels
    if kind == "tree":
        crown = torch.minimum(torch.sqrt(qx * qx + (qy - 0.35) ** 2) - 0.62,
                              torch.sqrt((qx * 1.3) ** 2 + (qy - 0.0) ** 2) - 0.5)
        trunk = _box(qx, qy, 0, -0.6, 0.14, 0.45)
        return crown, trunk
    raise ValueError(kind)


def render(p, frames=16, size=128, device="cpu", subject_counts=None):
    """Draws the clips: [n, frames, 3, size, size] in [0, 1].

    `subject_counts` (a host-side list, clips per entry of SUBJECTS) says
    that the clips are sorted by subject: each subject's shape is then
    drawn on a slice, and nothing waits for the device to say which clips
    hold which subject. Without it the clips may come in any order."""
    n = p["colour"].shape[0]
    H = W = size
    f = torch.arange(frames, device=device, dtype=torch.float32)
    t = (f / max(frames - 1, 1))[None, :, None, None]                     # [1,F,1,1]
    rows = torch.arange(H, device=device, dtype=torch.float32)
    cols = torch.arange(W, device=device, dtype=torch.float32)
    style = p["style"][:, None, None, None]
    pixel = style == STYLES.index("pixel")
    block = 8 * size / 128
    snap_c = torch.floor(cols / block) * block + block / 2 - 0.5
    snap_r = torch.floor(rows / block) * block + block / 2 - 0.5
    u = (cols + 0.5) / W * 2 - 1
    v = 1 - (rows + 0.5) / H * 2
    us = (snap_c + 0.5) / W * 2 - 1
    vs = 1 - (snap_r + 0.5) / H * 2
    u = torch.where(pixel, us[None, None, None, :], u[None, None, None, :])  # [n,1,1,W]
    v = torch.where(pixel, vs[None, None, :, None], v[None, None, :, None])  # [n,1,H,1]

    # Camera per clip and frame.
    cam = p["camera"][:, None, None, None]
    cx0 = p["cam_x"][:, None, None, None]
    zero = torch.zeros_like(t)
    is_cam = lambda name: (cam == CAMERAS.index(name)).float()  # noqa: E731
    cam_x = cx0 + PAN * t * (is_cam("pan-left") - is_cam("pan-right"))
    cam_y = zero + PAN * t * (is_cam("tilt-down") - is_cam("tilt-up"))
    zoom = torch.exp(ZOOM * t * (is_cam("zoom-in") - is_cam("zoom-out")))
    roll = ROLL * t * (is_cam("roll-cw") - is_cam("roll-ccw"))
    cr, sr = torch.cos(roll), torch.sin(roll)
    X = (cr * u - sr * v) / zoom + cam_x                                  # [n,F,H,W]
    Y = (sr * u + cr * v) / zoom + cam_y
    px = 2.0 / W / zoom                                                   # world units per pixel

    seed = p["seed"][:, None, None, None]
    scene = p["scene"][:, None, None, None, None]
    time = p["time"][:, None, None, None, None]
    is_scene = lambda name: scene == SCENES.index(name)  # noqa: E731
    is_time = lambda name: time == TIMES.index(name)  # noqa: E731
    rgb = lambda *c: _rgb(c, device)  # noqa: E731
    X5, Y5 = X[..., None], Y[..., None]

    # Sky, by time of day.
    sky_scene = is_scene("sky")
    g = torch.where(sky_scene, ((Y5 + 1.5) / 3).clamp(0, 1), ((Y5 - HORIZON) / 1.3).clamp(0, 1))
    day = _mix(rgb(0.75, 0.87, 1.0), rgb(0.28, 0.52, 0.92), g)
    cx, cy = torch.floor(X / 0.9), torch.floor(Y / 0.55)
    hc = _hash(cx, cy, seed)
    ox = (cx + 0.3 + 0.4 * _hash(cx, cy, seed + 1)) * 0.9
    oy = (cy + 0.35 + 0.3 * _hash(cx, cy, seed + 2)) * 0.55
    cloud_d = torch.minimum(torch.sqrt(((X - ox) / 0.26) ** 2 + ((Y - oy) / 0.09) ** 2),
                            torch.sqrt(((X - ox - 0.06) / 0.13) ** 2 + ((Y - oy - 0.07) / 0.09) ** 2))
    cloud = ((1.15 - cloud_d) * 4).clamp(0, 1) * (hc < 0.5).float()
    day = _mix(day, rgb(0.97, 0.97, 0.99), cloud[..., None])
    sunset = _mix(rgb(1.0, 0.62, 0.28), rgb(0.42, 0.18, 0.48), g)
    sun_d = torch.sqrt((X - cx0 - 0.3) ** 2 + (Y - HORIZON - 0.25) ** 2)
    sunset = _mix(sunset, rgb(1.0, 0.88, 0.45), ((0.22 - sun_d) / px + 0.5).clamp(0, 1)[..., None])
    night = _mix(rgb(0.10, 0.11, 0.26), rgb(0.02, 0.02, 0.08), g)
    sx, sy = torch.floor(X / 0.12), torch.floor(Y / 0.12)
    hs = _hash(sx, sy, seed + 3)
    star_x = (sx + 0.2 + 0.6 * _hash(sx, sy, seed + 4)) * 0.12
    star_y = (sy + 0.2 + 0.6 * _hash(sx, sy, seed + 5)) * 0.12
    star_d = torch.sqrt((X - star_x) ** 2 + (Y - star_y) ** 2)
    star = ((0.018 - star_d) / px + 0.8).clamp(0, 1) * (hs < 0.4).float()
    night = _mix(night, rgb(1.0, 1.0, 0.92), star[..., None])
    moon_d = torch.sqrt((X - cx0 + 0.5) ** 2 + (Y - HORIZON - 0.9) ** 2)
    night = _mix(night, rgb(0.95, 0.95, 0.85), ((0.13 - moon_d) / px + 0.5).clamp(0, 1)[..., None])
    sky = torch.where(is_time("day"), day, torch.where(is_time("sunset"), sunset, night))

    # Ground, by scene, then lit by the time of day.
    n1 = _noise(X * 6, Y * 6, seed)[..., None]
    n2 = _noise(X * 22, Y * 22, seed + 7)[..., None]
    grass = rgb(0.25, 0.62, 0.22) * (0.75 + 0.3 * n1 + 0.2 * n2)
    waves = torch.sin(X * 14 + Y * 45 + 5 * _noise(X * 2, Y * 6, seed + 8))[..., None]
    sea = _mix(rgb(0.07, 0.30, 0.60), rgb(0.45, 0.68, 0.92), ((waves - 0.6) * 3).clamp(0, 1))
    snow = rgb(0.93, 0.95, 0.99) * (0.88 + 0.1 * n1 + 0.04 * n2) + rgb(-0.1, -0.05, 0.0) * (1 - n1) * 0.5
    road = rgb(0.25, 0.25, 0.28) * (0.9 + 0.2 * n2)
    lit = torch.where(is_time("day"), rgb(1.0, 1.0, 1.0),
                      torch.where(is_time("sunset"), rgb(0.95, 0.72, 0.62), rgb(0.22, 0.25, 0.42)))
    ground = torch.where(is_scene("grass"), grass, torch.where(is_scene("sea"), sea,
                                                               torch.where(is_scene("snow"), snow, road))) * lit
    horizon = HORIZON + torch.where(is_scene("snow")[..., 0], 0.07 * torch.sin(X * 3 + seed), torch.zeros_like(X))
    below = ((horizon - Y) / px + 0.5).clamp(0, 1)[..., None]
    img = _mix(sky, ground, torch.where(sky_scene, torch.zeros_like(below), below))

    # City buildings in front of the sky.
    bi = torch.floor(X / 0.22)
    top = HORIZON + 0.25 + 0.7 * _hash(bi, bi * 0.0, seed + 9)
    inside = ((Y > HORIZON) & (Y < top) & is_scene("city")[..., 0]).float()
    wall = rgb(0.30, 0.32, 0.40) * (0.75 + 0.45 * _hash(bi, bi * 0.0 + 1, seed + 10))[..., None] * lit
    wx, wy = torch.floor(X / 0.055), torch.floor(Y / 0.07)
    fx, fy = X / 0.055 - wx, Y / 0.07 - wy
    window = ((fx > 0.25) & (fx < 0.75) & (fy > 0.25) & (fy < 0.72)).float()
    on = (_hash(wx, wy, seed + 11) < 0.55).float()
    glass = torch.where(is_time("night"), _mix(rgb(0.1, 0.1, 0.15), rgb(1.0, 0.85, 0.4), on[..., None]),
                        rgb(0.62, 0.76, 0.9) * lit)
    wall = _mix(wall, glass, window[..., None])
    img = _mix(img, wall, inside[..., None])

    plain = _col(_rgb(list(BACKGROUNDS.values()), device), p["background"])
    img = torch.where(is_scene("plain"), plain.expand_as(img), img)

    # The subject, moving in world coordinates.
    action = p["action"][:, None, None, None]
    is_act = lambda name: (action == ACTIONS.index(name)).float()  # noqa: E731
    s0 = p["size"][:, None, None, None]
    jx = p["jx"][:, None, None, None] * 0.2
    jy = p["jy"][:, None, None, None] * 0.2
    travel = 1.0
    sx_ = jx + travel * (0.5 - t) * is_act("left") - travel * (0.5 - t) * is_act("right")
    sy_ = jy + travel * (t - 0.5) * is_act("up") - travel * (t - 0.5) * is_act("down")
    sy_ = sy_ + is_act("falling") * (0.55 - 1.2 * t * t - jy)
    bounce = (torch.sin(math.pi * 2 * t + p["phase"][:, None, None, None] * 0).abs() * 0.7 - 0.45)
    sy_ = sy_ + is_act("bouncing") * (bounce - jy)
    scale = s0 * (1 + is_act("growing") * (1.6 * t - 0.6) + is_act("shrinking") * (0.8 - 1.3 * t) * 1.0)
    scale = scale * (1 - 0.25 * is_act("shrinking") * 0)
    ang = is_act("spinning") * p["spin"][:, None, None, None] * 2 * math.pi * t
    lx = (X - cx0 - sx_) / scale
    ly = (Y - sy_) / scale
    ca, sa = torch.cos(ang), torch.sin(ang)
    qx = ca * lx + sa * ly
    qy = -sa * lx + ca * ly
    flip = torch.where(is_act("left") > 0, -1.0, 1.0)
    if style.is_floating_point():
        raise TypeError("style must be integer")
    if subject_counts is None:
        sdf = torch.full_like(X, 10.0)
        detail = torch.full_like(X, 10.0)
        for k, kind in enumerate(SUBJECTS):
            sel = (p["subject"] == k)
            if not bool(sel.any()):
                continue
            a, b = _subject_sdf(kind, qx[sel], qy[sel], t.expand(int(sel.sum()), -1, H, W)[..., :1, :1], flip[sel])
            sdf[sel] = a
            detail[sel] = b
    else:
        if len(subject_counts) != len(SUBJECTS) or sum(subject_counts) != n:
            raise ValueError(f"subject_counts: expected {len(SUBJECTS)} counts summing to {n} clips, "
                             f"found {list(subject_counts)}")
        parts, start = [], 0
        for kind, count in zip(SUBJECTS, subject_counts):
            if count:
                sl = slice(start, start + count)
                parts.append(_subject_sdf(kind, qx[sl], qy[sl], t.expand(count, -1, H, W)[..., :1, :1], flip[sl]))
                start += count
        sdf = torch.cat([a for a, _ in parts])
        detail = torch.cat([b for _, b in parts])
    painterly = style == STYLES.index("painterly")
    wobble = (_noise(qx * 2.5, qy * 2.5, seed + 12) - 0.5) * 0.12
    sdf = torch.where(painterly, sdf + wobble, sdf)
    d_px = sdf * scale / px                                               # signed distance in pixels
    e_px = detail * scale / px
    soft = torch.where(painterly, torch.full_like(d_px, 2.5), torch.ones_like(d_px))
    alpha = (0.5 - d_px / soft).clamp(0, 1)
    alpha = torch.where(pixel, (d_px < 0).float(), alpha)
    alpha_d = (0.5 - e_px).clamp(0, 1)
    alpha_d = torch.where(pixel, (e_px < 0).float(), alpha_d)
    colour = _col(_rgb(list(COLOURS.values()), device), p["colour"])
    # A little shading so that shapes read as objects.
    shade = (1.0 + 0.12 * (qy.clamp(-1, 1))[..., None])
    fill = (colour * shade).clamp(0, 1)
    dark = rgb(0.12, 0.1, 0.1)
    body = _mix(fill, dark, alpha_d[..., None])
    out = _mix(img, body, alpha[..., None])

    # Neon: a dark world, the subject a glowing outline.
    glow = torch.exp(-d_px.abs() / 3.0)[..., None]
    line = (1.3 - d_px.abs()).clamp(0, 1)[..., None]
    neon = img * 0.22 + colour * 0.18 * alpha[..., None]
    neon = neon + colour * glow * 0.9 + line * (0.5 * colour + 0.5)
    out = torch.where(style[..., None] == STYLES.index("neon"), neon, out)

    # Pixel art: a small palette.
    out = torch.where(pixel[..., None], torch.round(out.clamp(0, 1) * 4) / 4, out)

    # Watercolour: paper texture fixed to the screen, soft washes.
    paper = _noise(u * 40 + seed, v * 40, seed + 13)[..., None] * torch.ones_like(X)[..., None]
    wash = _noise(X * 3, Y * 3, seed + 14)[..., None]
    water = out * (0.86 + 0.18 * wash) * (0.95 + 0.08 * paper)
    water = _mix(water, rgb(0.97, 0.95, 0.88), 0.18)
    out = torch.where(painterly[..., None], water, out)

    return out.clamp(0, 1).permute(0, 1, 4, 2, 3).contiguous()


def make_batch(rng, n, frames=16, size=128, device="cpu", gen=None):
    """n random training clips and their random captions."""
    items = [sample_choices(rng) for _ in range(n)]
    caps = [caption(c, rng) for c in items]
    gen = gen or torch.Generator().manual_seed(rng.randrange(1 << 30))
    clips = render(choices_to_tensors(items, device, gen), frames, size, device)
    return clips, caps, items


def draw_batch(rng, n, recipe=None):
    """The host's part of a training batch, drawn without touching the
    device: n clips' choices sorted by subject (see `render`), their
    captions and their render parameters on the CPU. `render_batch` draws
    it on the device."""
    items = sorted((sample_choices(rng, recipe=recipe) for _ in range(n)), key=lambda c: SUBJECTS.index(c["subject"]))
    share = recipe.canonical_share if recipe else 0.0
    caps = [caption(c) if share and rng.random() < share else caption(c, rng) for c in items]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    params = choices_to_tensors(items, "cpu", gen)
    counts = [sum(1 for c in items if c["subject"] == s) for s in SUBJECTS]
    return dict(items=items, captions=caps, params=params, subject_counts=counts)


def render_batch(batch, frames, size, device, pin=True, chunk=32):
    """Draws a `draw_batch` batch on the device: [n, frames, 3, size, size],
    `chunk` clips at a time (the renderer's intermediates are a few
    hundred MB per chunk at 128 px)."""
    p = to_device(batch["params"], device, pin)
    subjects = [SUBJECTS.index(c["subject"]) for c in batch["items"]]
    out = []
    for i in range(0, len(subjects), chunk):
        part = subjects[i:i + chunk]
        counts = [part.count(k) for k in range(len(SUBJECTS))]
        out.append(render({k: v[i:i + chunk] for k, v in p.items()}, frames, size, device, counts))
    return out[0] if len(out) == 1 else torch.cat(out)


if __name__ == "__main__":
    import argparse

    from PIL import Image

    ap = argparse.ArgumentParser(description="Writes a contact sheet of random clips of the synthetic world.")
    ap.add_argument("--out", default="world.png")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out", action="store_true", help="draw the evaluation split instead")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.held_out:
        items = held_out_split()[: a.n]
        caps = [caption(c) for c in items]
        clips = render(choices_to_tensors(items, "cpu", torch.Generator().manual_seed(0)))
    else:
        clips, caps, _ = make_batch(rng, a.n)
    for c in caps:
        print(c)
    sheet = clips[:, ::3].permute(0, 3, 1, 4, 2).reshape(a.n * 128, -1, 3)
    Image.fromarray((sheet.numpy() * 255).astype("uint8")).save(a.out)
    print("wrote", a.out)
