"""A small line-plot renderer that writes PNG with the standard library only.

The main job's figure (gmpo_ext.demo) is drawn with matplotlib when it is
installed (the ``demo`` extra); this renders the same panels where it is not
(the test environment, bare machines): lines, shaded bands, axes with ticks,
titles and legends, text in a 5x7 bitmap font (upper case). PNG written with
zlib, 8-bit RGB, no filter.

Points with an infinite or NaN coordinate are left out (the line joins
the points on either side). A panel is a dict: ``title``, ``xlabel``, ``ylabel``, ``hline`` (a y value or
None) and ``series``: a list of dicts with ``label``, ``color`` (an (r, g, b)
tuple), ``x``, ``y`` and optionally ``lo``, ``hi`` (the band) and ``legend``
(False: no legend entry). The figure has one legend, under its title: each
label once.
"""

from __future__ import annotations

import math
import struct
import zlib

# 5x7 glyphs, rows top to bottom; lower case is drawn as upper case
_GLYPHS = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "####.|....#|....#|.###.|....#|....#|####.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "###..|#..#.|#...#|#...#|#...#|#..#.|###..",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    ";": ".....|.##..|.##..|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "[": ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
    "]": ".###.|...#.|...#.|...#.|...#.|...#.|.###.",
    "/": "....#|...#.|...#.|..#..|.#...|.#...|#....",
    "%": "##..#|##..#|...#.|..#..|.#...|#..##|#..##",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....",
    "|": "..#..|..#..|..#..|..#..|..#..|..#..|..#..",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "\u00b1": "..#..|..#..|#####|..#..|..#..|.....|#####",
}
_FONT = {ch: [[c == "#" for c in row] for row in g.split("|")] for ch, g in _GLYPHS.items()}
_ADV = 6      # glyph advance (5 + 1 space), in font pixels


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * _ADV * scale


class Canvas:
    """An RGB image in a bytearray; (0, 0) is the top left pixel."""

    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.w, self.h = int(width), int(height)
        self.px = bytearray(bytes(background) * (self.w * self.h))

    def blend(self, x: int, y: int, rgb, alpha: float = 1.0):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            if alpha >= 1.0:
                self.px[i:i + 3] = bytes(rgb)
            else:
                for k in range(3):
                    self.px[i + k] = int(round(self.px[i + k] * (1 - alpha) + rgb[k] * alpha))

    def line(self, x0, y0, x1, y1, rgb, width: int = 2):
        """A straight segment, ``width`` pixels thick (square brush)."""
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        r0 = -(width // 2)
        for k in range(n + 1):
            t = k / n
            x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
            for dx in range(r0, r0 + width):
                for dy in range(r0, r0 + width):
                    self.blend(x + dx, y + dy, rgb)

    def vspan(self, x: int, ya: float, yb: float, rgb, alpha: float):
        lo, hi = sorted((ya, yb))
        for y in range(int(math.ceil(lo)), int(math.floor(hi)) + 1):
            self.blend(x, y, rgb, alpha)

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2, vertical=False):
        """``s`` with its top left corner at (x, y); ``vertical``: rotated 90 degrees
        counter-clockwise, (x, y) then its bottom left corner."""
        for n, ch in enumerate(s):
            g = _FONT.get(ch.upper(), _FONT["?"])
            for r, row in enumerate(g):
                for c, on in enumerate(row):
                    if not on:
                        continue
                    u, v = n * _ADV + c, r          # along the text, down the glyph
                    for a in range(scale):
                        for b in range(scale):
                            if vertical:
                                self.blend(x + v * scale + b, y - u * scale - a, rgb)
                            else:
                                self.blend(x + u * scale + a, y + v * scale + b, rgb)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * self.w * y:3 * self.w * (y + 1)])
                       for y in range(self.h))

        def chunk(tag, data):
            return (struct.pack(">I", len(data)) + tag + data +
                    struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
        return (b"\x89PNG\r\n\x1a\n" +
                chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

    def save(self, path: str):
        with open(path, "wb") as f:
            f.write(self.png())


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5):
    """About ``n`` round tick values covering [lo, hi] (steps 1, 2, 2.5, 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    raw = (hi - lo) / max(1, n)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(k * mag for k in (1, 2, 2.5, 5, 10) if k * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9) * step
    out, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        out.append(round(first + k * step, 12))
        k += 1
    return out


def _fmt(v: float, ticks) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    nd = max(0, -int(math.floor(math.log10(step) + 1e-9)))
    if abs(step * 10 ** nd - round(step * 10 ** nd)) > 1e-6:
        nd += 1
    s = f"{v:.{nd}f}"
    return "0" if float(s) == 0 else s


def render(path: str, panels, title: str = "", width: int = 1500, height: int = 470):
    """Draw ``panels`` (see the module docstring) side by side and write PNG."""
    cv = Canvas(width, height)
    sc = 2
    ch = 7 * sc
    top = 12
    if title:
        cv.text(max(4, (width - text_width(title, sc)) // 2), top, title, scale=sc)
        top += ch + 12
    # one legend for the figure, under the title: every label once
    seen = {}
    for p in panels:
        for s in p["series"]:
            if s.get("legend", True):
                seen.setdefault(s["label"], s["color"])
    if seen:
        widths = [40 + text_width(lab, sc) + 30 for lab in seen]
        x = (width - sum(widths)) // 2
        for (lab, color), w in zip(seen.items(), widths):
            cv.line(x, top + ch // 2, x + 30, top + ch // 2, color, width=3)
            cv.text(x + 38, top, lab, scale=sc)
            x += w
        top += ch + 14
    pw = width / len(panels)
    for k, p in enumerate(panels):
        x0 = int(k * pw) + 30 + 6 * _ADV * sc          # room for the y label and tick labels
        x1 = int((k + 1) * pw) - 16
        y0, y1 = top + ch + 10, height - 2 * ch - 26    # plot area, pixels (y0 top)
        xs = [v for s in p["series"] for v in s["x"] if _finite(v)]
        ys = [v for s in p["series"] for key in ("y", "lo", "hi") for v in s.get(key) or []
              if v == v and math.isfinite(v)]
        if p.get("hline") is not None:
            ys.append(p["hline"])
        xmin, xmax = (min(xs), max(xs)) if xs else (0.0, 1.0)
        ymin, ymax = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if xmax <= xmin:
            xmin, xmax = xmin - 0.5, xmax + 0.5
        pad = (ymax - ymin) * 0.05 or 0.5
        ymin, ymax = ymin - pad, ymax + pad

        def X(v):
            return x0 + (v - xmin) / (xmax - xmin) * (x1 - x0)

        def Y(v):
            return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

        # grid, ticks, labels
        xt = [t for t in nice_ticks(xmin, xmax, 6) if xmin <= t <= xmax]
        yt = [t for t in nice_ticks(ymin, ymax, 5) if ymin <= t <= ymax]
        for t in xt:
            x = int(round(X(t)))
            for y in range(y0, y1):
                cv.blend(x, y, (0, 0, 0), 0.08)
            lab = _fmt(t, xt)
            cv.text(x - text_width(lab, sc) // 2, y1 + 6, lab, scale=sc)
        for t in yt:
            y = int(round(Y(t)))
            for x in range(x0, x1):
                cv.blend(x, y, (0, 0, 0), 0.08)
            lab = _fmt(t, yt)
            cv.text(x0 - 6 - text_width(lab, sc), y - ch // 2, lab, scale=sc)
        if p.get("hline") is not None:
            y = Y(p["hline"])
            cv.line(x0, y, x1, y, (0, 0, 0), width=1)
        # bands, then lines
        for s in p["series"]:
            if s.get("lo") is None:
                continue
            pts = [(X(a), Y(b), Y(c)) for a, b, c in zip(s["x"], s["lo"], s["hi"])
                   if _finite(a) and _finite(b) and _finite(c)]
            for (xa, la, ha), (xb, lb, hb) in zip(pts, pts[1:]):
                for x in range(int(math.ceil(xa)), int(math.ceil(xb))):
                    t = (x - xa) / (xb - xa) if xb > xa else 0.0
                    cv.vspan(x, la + (lb - la) * t, ha + (hb - ha) * t, s["color"], 0.22)
        for s in p["series"]:
            pts = [(X(a), Y(b)) for a, b in zip(s["x"], s["y"]) if _finite(a) and _finite(b)]
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                cv.line(xa, ya, xb, yb, s["color"], width=2)
            if len(pts) == 1:
                cv.line(pts[0][0], pts[0][1], pts[0][0], pts[0][1], s["color"], width=4)
        # frame
        for a, b, c, d in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
            cv.line(a, b, c, d, (0, 0, 0), width=1)
        pt = p.get("title", "")
        ts = sc if text_width(pt, sc) <= x1 - x0 else 1     # a long title: the small font
        cv.text(x0 + (x1 - x0 - text_width(pt, ts)) // 2, top + (sc - ts) * 7 // 2, pt, scale=ts)
        xl = p.get("xlabel", "")
        cv.text(x0 + (x1 - x0 - text_width(xl, sc)) // 2, y1 + ch + 14, xl, scale=sc)
        yl = p.get("ylabel", "")
        ys = sc if text_width(yl, sc) <= y1 - y0 else 1
        cv.text(int(k * pw) + 6, (y0 + y1) // 2 + text_width(yl, ys) // 2, yl, scale=ys,
                vertical=True)
    cv.save(path)
