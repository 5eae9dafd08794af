"""The run folder's ``metrics.png``: training loss and validation mIoU against step, drawn with Pillow."""
from __future__ import annotations

import io
import json
from pathlib import Path

from .._atomic import write_atomic


def plot_metrics(log_path: str | Path, png_path: str | Path, width: int = 900, height: int = 620) -> Path | None:
    """Training loss and validation mIoU against step, from ``log.jsonl``, as a PNG (Pillow only)."""
    from PIL import Image, ImageDraw
    rows = []
    p = Path(log_path)
    if not p.is_file():
        return None
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}            # a resumed run's rows replace old ones
    val = {r["step"]: r["val_mean"] for r in rows if r.get("val_mean") is not None}
    if not loss and not val:
        return None
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    steps_all = sorted(set(loss) | set(val))
    x0, x1 = 70, width - 25
    xmax = max(steps_all[-1], 1)

    def panel(top: int, bottom: int, series: dict, title: str, colour, ylo=None, yhi=None) -> None:
        d.rectangle([x0, top, x1, bottom], outline="black")
        d.text((x0, top - 16), title, fill="black")
        if not series:
            d.text((x0 + 10, top + 10), "no values yet", fill="grey")
            return
        xs, ys = zip(*sorted(series.items()))
        lo = min(ys) if ylo is None else ylo
        hi = max(ys) if yhi is None else yhi
        if hi - lo < 1e-9:
            hi = lo + 1.0
        for t in range(5):  # y ticks and grid
            v = lo + (hi - lo) * t / 4
            y = bottom - (bottom - top) * t / 4
            d.line([x0, y, x1, y], fill=(225, 225, 225))
            d.text((5, y - 6), f"{v:.3g}", fill="black")
        for t in range(6):  # x ticks
            v = xmax * t / 5
            x = x0 + (x1 - x0) * t / 5
            d.line([x, bottom, x, bottom + 4], fill="black")
            d.text((x - 12, bottom + 6), f"{int(v)}", fill="black")
        pts = [(x0 + (x1 - x0) * x / xmax, bottom - (bottom - top) * (y - lo) / (hi - lo)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) < 60 else pts[-1:]:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.rectangle([x0, top, x1, bottom], outline="black")  # the frame over the grid lines

    mid = height // 2
    panel(30, mid - 30, loss, "training loss (EMA) vs step", (200, 40, 40))
    panel(mid + 20, height - 30, val, "validation mIoU (mean over datasets) vs step", (30, 90, 200), 0.0,
          max(1e-3, max(val.values())) if val else None)
    d.text((x1 - 30, height - 16), "step", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(Path(png_path), buf.getvalue())
    return Path(png_path)
