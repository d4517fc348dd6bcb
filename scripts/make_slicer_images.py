"""Draw the Slicer extension's pictures: the icons and a screenshot of the CT2XSynth panel layout.

    python scripts/make_slicer_images.py

Writes Resources/CT2X.png and CT2XSynth/Resources/Icons/CT2XSynth.png (128 x 128: a source, its fan beam through a
chest and the film it makes) and Resources/Screenshot01.png: the module panel drawn from CT2XSynth.ui (sections,
labels and widgets in .ui order, with the .ui's texts and values) beside real DRRs of the chest phantom. No Slicer
is involved, and the screenshot says so. Dev-time only: needs Pillow, which CT2X itself does not use.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ct2x.drr import DRRRenderer, fitted_detector_spacing_mm
from ct2x.geometry import CArm
from ct2x.phantoms import chest

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "CT2XSynth" / "Resources" / "UI" / "CT2XSynth.ui"
FONT_FILE = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
ICON_SIZE = 128

PANEL_WIDTH, ROW_HEIGHT, MARGIN = 480, 34, 16
LABEL_WIDTH = 190
INK, MUTED, FRAME, FIELD, HEADER, BACKGROUND = "#202020", "#707070", "#a9a9a9", "#ffffff", "#dcdcdc", "#efefef"


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    path = FONT_FILE.replace("Sans.ttf", "Sans-Bold.ttf") if bold else FONT_FILE
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


FILM_GEOMETRY = "the module's defaults: SDD 1020 mm, SID 530 mm, pixel spacing fitted to the body"


def chest_films() -> List[np.ndarray]:
    """8-bit 256 x 256 DRRs (H, W) of the chest phantom at 0 deg (AP) and +90 deg (left lateral), as the module
    renders them by default (60 kV, detector spacing fitted to the body, display window from the first view)."""
    volume, carm = chest(), CArm()
    renderer = DRRRenderer(volume, carm.with_detector(256, fitted_detector_spacing_mm(volume, carm, 256)))
    return [renderer.render(angle).display for angle in (0.0, 90.0)]


# --- icon ----------------------------------------------------------------------------------------------------


def draw_icon(film: np.ndarray) -> Image.Image:
    """Source (left), fan beam through a chest cross-section, the film it makes (a real DRR, right)."""
    scale = 4  # draw large, then downsample: smooth edges
    size = ICON_SIZE * scale
    icon = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle([0, 0, size - 1, size - 1], radius=22 * scale, fill="#1d2733")
    source = (12 * scale, 64 * scale)
    film_box = [66 * scale, 36 * scale, 122 * scale, 92 * scale]  # the film, facing the viewer
    beam = Image.new("RGBA", icon.size, (0, 0, 0, 0))
    ImageDraw.Draw(beam).polygon([source, (film_box[0], film_box[1]), (film_box[0], film_box[3])],
                                 fill=(255, 214, 102, 70))
    icon = Image.alpha_composite(icon, beam)
    draw = ImageDraw.Draw(icon)
    draw.ellipse([27 * scale, 42 * scale, 59 * scale, 86 * scale], fill="#8a97a6")  # chest seen from above
    draw.ellipse([30 * scale, 48 * scale, 41 * scale, 78 * scale], fill="#33404f")  # lungs
    draw.ellipse([45 * scale, 48 * scale, 56 * scale, 78 * scale], fill="#33404f")
    draw.ellipse([40 * scale, 77 * scale, 46 * scale, 83 * scale], fill="#f4f4f4")  # spine
    draw.ellipse([source[0] - 6 * scale, source[1] - 6 * scale, source[0] + 6 * scale, source[1] + 6 * scale],
                 fill="#ffd666")
    film_size = (film_box[2] - film_box[0], film_box[3] - film_box[1])
    tile = Image.fromarray(film).convert("RGBA").resize(film_size, Image.LANCZOS)
    icon.paste(tile, (film_box[0], film_box[1]))
    draw.rectangle(film_box, outline="#f4f4f4", width=2 * scale)
    return icon.resize((ICON_SIZE, ICON_SIZE), Image.LANCZOS)


# --- panel drawn from the .ui --------------------------------------------------------------------------------


def prop(widget: ET.Element, name: str) -> Optional[str]:
    """A property's value as text (string, number, double, bool or enum)."""
    element = widget.find(f"property[@name='{name}']")
    return None if element is None or len(element) == 0 else (element[0].text or "")


def widget_text(widget: ET.Element) -> str:
    """What the widget shows, from the .ui alone."""
    kind = widget.get("class")
    if kind in ("QComboBox",):
        item = widget.find("item/property/string")
        return item.text if item is not None else ""
    if kind == "qMRMLNodeComboBox":
        return prop(widget, "noneDisplay") or "chest phantom"  # the input shows an example CT name
    if kind in ("QSpinBox", "QDoubleSpinBox"):
        value, minimum = prop(widget, "value") or prop(widget, "minimum") or "0", prop(widget, "minimum") or "0"
        if prop(widget, "specialValueText") and float(value) == float(minimum):
            return prop(widget, "specialValueText")
        decimals = int(prop(widget, "decimals") or 0) if kind == "QDoubleSpinBox" else 0
        return f"{float(value):.{decimals}f}{prop(widget, 'suffix') or ''}"
    return prop(widget, "text") or ""


def draw_field(draw: ImageDraw.ImageDraw, widget: ET.Element, box: Tuple[int, int, int, int]) -> None:
    """One widget in its box, drawn in a plain Qt-like style."""
    x0, y0, x1, y1 = box
    kind, small = widget.get("class"), font(13)
    middle = (y0 + y1) // 2
    if kind == "ctkSliderWidget":
        low, high = float(prop(widget, "minimum")), float(prop(widget, "maximum"))
        value = float(prop(widget, "value") or 0)
        track_end = x1 - 78
        draw.line([x0 + 4, middle, track_end, middle], fill=FRAME, width=4)
        handle = x0 + 4 + (track_end - x0 - 4) * (value - low) / (high - low)
        draw.ellipse([handle - 7, middle - 7, handle + 7, middle + 7], fill="#3b7dd8")
        draw.rectangle([x1 - 70, y0, x1, y1], fill=FIELD, outline=FRAME)
        draw.text((x1 - 64, middle), f"{value:.0f}{prop(widget, 'suffix') or ''}", fill=INK, font=small, anchor="lm")
    elif kind == "QCheckBox":
        draw.rectangle([x0, middle - 7, x0 + 14, middle + 7], fill=FIELD, outline=FRAME)
        if prop(widget, "checked") == "true":
            draw.line([x0 + 3, middle, x0 + 6, middle + 4, x0 + 12, middle - 5], fill=INK, width=2)
        draw.text((x0 + 22, middle), widget_text(widget), fill=INK, font=small, anchor="lm")
    elif kind == "QPushButton":
        draw.rounded_rectangle(box, radius=4, fill="#e6e6e6", outline=FRAME)
        enabled = prop(widget, "enabled") != "false"
        draw.text(((x0 + x1) // 2, middle), widget_text(widget), fill=INK if enabled else MUTED, font=small,
                  anchor="mm")
    elif kind == "QLabel":
        draw.text((x0, middle), widget_text(widget), fill=MUTED, font=small, anchor="lm")
    else:  # combo boxes, node selectors, spin boxes, line edits: a white field with text
        draw.rectangle(box, fill=FIELD, outline=FRAME)
        draw.text((x0 + 6, middle), widget_text(widget), fill=INK, font=small, anchor="lm")
        if kind in ("QComboBox", "qMRMLNodeComboBox"):
            draw.polygon([(x1 - 16, middle - 3), (x1 - 8, middle - 3), (x1 - 12, middle + 3)], fill=INK)


def wrap(draw: ImageDraw.ImageDraw, text: str, text_font: ImageFont.ImageFont, width: int) -> List[str]:
    """`text` broken at spaces into lines no wider than `width` pixels."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(candidate, font=text_font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def form_rows(layout: ET.Element) -> List[Tuple[Optional[ET.Element], List[ET.Element]]]:
    """(label or None, widgets) per row of a QFormLayout, in row order."""
    rows = {}
    for item in layout.findall("item"):
        row, column = int(item.get("row")), int(item.get("column"))
        child = item.find("widget")
        widgets = [child] if child is not None else [w for w in item.find("layout").iter("widget")]
        label, fields = rows.get(row, (None, []))
        rows[row] = (widgets[0], fields) if column == 0 else (label, fields + widgets)
    return [rows[r] for r in sorted(rows)]


def draw_panel(draw: ImageDraw.ImageDraw, origin: Tuple[int, int]) -> int:
    """Draw the .ui's top-level items downwards from `origin`; returns the bottom y."""
    x, y = origin
    top = ET.parse(UI_FILE).getroot().find("widget")
    for item in top.find("layout").findall("item"):
        widget = item.find("widget")
        if widget is None:  # spacer
            continue
        if widget.get("class") != "ctkCollapsibleButton":
            draw_field(draw, widget, (x, y + 4, x + PANEL_WIDTH, y + ROW_HEIGHT - 2))
            y += ROW_HEIGHT + 4
            continue
        collapsed = prop(widget, "collapsed") == "true"
        draw.rounded_rectangle([x, y, x + PANEL_WIDTH, y + 28], radius=4, fill=HEADER, outline=FRAME)
        arrow = [(x + 10, y + 9), (x + 20, y + 9), (x + 15, y + 19)] if not collapsed else \
            [(x + 11, y + 8), (x + 11, y + 20), (x + 20, y + 14)]
        draw.polygon(arrow, fill=INK)
        draw.text((x + 28, y + 14), prop(widget, "text"), fill=INK, font=font(14, bold=True), anchor="lm")
        y += 34
        rows = form_rows(widget.find("layout"))
        if collapsed:
            hidden = ", ".join(widget_text(label).rstrip(":") for label, _ in rows if label is not None)
            for line in wrap(draw, f"collapsed: {hidden}", font(12), PANEL_WIDTH - 28):
                draw.text((x + 28, y + 2), line, fill=MUTED, font=font(12))
                y += 18
            y += 8
            continue
        for label, fields in rows:
            if label is not None:
                draw.text((x + 12, y + ROW_HEIGHT // 2), widget_text(label), fill=INK, font=font(13), anchor="lm")
            left = x + LABEL_WIDTH
            width = (x + PANEL_WIDTH - left - 6 * (len(fields) - 1)) // max(len(fields), 1)
            for field in fields:
                draw_field(draw, field, (left, y + 4, left + width, y + ROW_HEIGHT - 4))
                left += width + 6
            y += ROW_HEIGHT
        y += 8
    return y


def draw_screenshot(films: List[np.ndarray]) -> Image.Image:
    film_px = 360
    width, height = MARGIN * 4 + PANEL_WIDTH + 2 * film_px, 700
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), "CT to X-ray (CT2XSynth)", fill=INK, font=font(18, bold=True))
    draw_panel(draw, (MARGIN, MARGIN + 36))
    left = MARGIN * 2 + PANEL_WIDTH + MARGIN
    draw.text((left, MARGIN + 4), "Output X-ray: Physics DRR of the chest phantom, 60 kV, 256 x 256 px",
              fill=INK, font=font(14, bold=True))
    draw.text((left, MARGIN + 22), FILM_GEOMETRY, fill=MUTED, font=font(12))
    for index, (film, caption) in enumerate(zip(films, ("horizontal angle 0° (AP)", "horizontal angle +90° "
                                                                                    "(left lateral)"))):
        x = left + index * (film_px + MARGIN // 2)
        image.paste(Image.fromarray(film).resize((film_px, film_px), Image.LANCZOS), (x, MARGIN + 44))
        draw.text((x + film_px // 2, MARGIN + 52 + film_px), caption, fill=INK, font=font(13), anchor="mt")
    notes = [
        "Panel layout drawn from CT2XSynth/Resources/UI/CT2XSynth.ui by scripts/make_slicer_images.py,",
        "not a Slicer screen capture: sections, labels, widgets and their default values come from the .ui;",
        "the input name is an example. The X-rays are real renders of ct2x.phantoms.chest() by ct2x.drr.",
        "In Slicer the film appears in the Red slice view and on its detector plane in the 3-D view.",
    ]
    for line, text in enumerate(notes):
        draw.text((left, height - MARGIN - (len(notes) - line) * 20), text, fill=MUTED, font=font(13))
    return image


def main() -> None:
    films = chest_films()
    icon = draw_icon(films[0])
    for path in (ROOT / "Resources" / "CT2X.png", ROOT / "CT2XSynth" / "Resources" / "Icons" / "CT2XSynth.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
    draw_screenshot(films).save(ROOT / "Resources" / "Screenshot01.png", optimize=True)


if __name__ == "__main__":
    main()
