"""Contact sheets of the neighbour audit (`ssl neighbors --query ID --image FILE`).

One row of thumbnails: the query, then its neighbours, like the AdaSim paper's Figures 1 / A2 / A3.
Works for both audits: a neighbour's bar shows its p_win (the AdaSim window) or its cosine
similarity (the feature graph).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from sslcli import runfiles
from sslcli.data.datasets import ImageDataset

logger = logging.getLogger(__name__)

PAD, SEP, TEXT, BAR, FRAME = 4, 8, 16, 6, 3
QUERY_COLOUR, OTHER_COLOUR, BAR_COLOUR = (40, 110, 230), (220, 30, 30), (30, 200, 60)


def contact_sheet(result: dict, images: ImageDataset | Callable[[int], Image.Image], path: Path,
                  cell: int = 128) -> Path:
    """A PNG of the query, then its neighbours in one row (AdaSim Figures 1 / A2 / A3).

    Size, for k = len(result["neighbors"]) and the default cell = 128:
        width  = (1 + k) * (cell + PAD) + PAD + SEP     (PAD = 4, SEP = 8: the gap after the query)
        height = cell + TEXT + 2 * PAD                  (TEXT = 16: one text line under each image)
    i.e. 132 * (1 + k) + 12 by 152 pixels. Each image is centre-cropped to a cell x cell thumbnail;
    a green bar at a neighbour's bottom-left is p_win * cell wide (the cosine similarity, clipped to
    [0, 1], for the feature graph; BAR = 6 px high); the text line
    is "id / class id". The query has a blue frame and a "query" tag (the neighbour that is the
    query itself has the blue frame too); neighbours of another class have a red frame and red text.
    `images` is an ImageDataset or a function id -> PIL image; unreadable images are drawn grey.
    """
    load = images.load if isinstance(images, ImageDataset) else images
    cells = [(result["query"], None)] + [(n, n) for n in result["neighbors"]]
    sheet = Image.new("RGB", (len(cells) * (cell + PAD) + PAD + SEP, cell + TEXT + 2 * PAD), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for c, (item, neighbour) in enumerate(cells):
        x = PAD + c * (cell + PAD) + (SEP if c > 0 else 0)
        try:
            thumb = ImageOps.fit(load(item["id"]).convert("RGB"), (cell, cell))
        except (OSError, ValueError) as e:
            logger.warning("cannot read image %d for the contact sheet: %s", item["id"], e)
            thumb = Image.new("RGB", (cell, cell), (128, 128, 128))
        sheet.paste(thumb, (x, PAD))
        colour = None
        if neighbour is None or neighbour["is_query"]:
            colour = QUERY_COLOUR
        elif neighbour["other_class"]:
            colour = OTHER_COLOUR
        if colour is not None:
            draw.rectangle([x, PAD, x + cell - 1, PAD + cell - 1], outline=colour, width=FRAME)
        if neighbour is None:
            draw.rectangle([x, PAD, x + 40, PAD + 13], fill=QUERY_COLOUR)
            draw.text((x + 3, PAD + 1), "query", fill="white", font=font)
        else:
            width = int(round(min(max(neighbour.get("p_win", neighbour.get("similarity", 0.0)), 0.0), 1.0) * cell))
            if width > 0:
                draw.rectangle([x, PAD + cell - BAR, x + width - 1, PAD + cell - 1], fill=BAR_COLOUR)
        text_colour = OTHER_COLOUR if neighbour is not None and neighbour["other_class"] else (0, 0, 0)
        draw.text((x, PAD + cell + 2), f"{item['id']} / {item['class_id']}", fill=text_colour, font=font)
    path = Path(path)
    runfiles.write_atomically(path, lambda tmp: sheet.save(tmp, format="PNG"), what="contact sheet")
    return path
