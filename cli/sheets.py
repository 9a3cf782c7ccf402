"""Contact sheets: captioned images side by side (the demo's stage sheets)."""

from __future__ import annotations

import cv2
import numpy as np

from easyphoto.imaging.geometry import resize


def contact_sheet(images: list[tuple[str, np.ndarray]], height: int = 256, banner: str = "") -> np.ndarray:
    """Images side by side at one height, each captioned, with an optional banner line on top."""
    return contact_sheet_rows([images], height, banner)


def contact_sheet_rows(
    rows: list[list[tuple[str, np.ndarray]]], height: int = 256, banner: str = ""
) -> np.ndarray:
    """One captioned row of images per list, rows left-aligned on white, optional banner on top."""
    strips = [_captioned_row(row, height) for row in rows if row]
    width = max(strip.shape[1] for strip in strips)
    sheet = np.vstack(
        [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    )
    if banner:
        strip = np.full((26, sheet.shape[1], 3), (255, 235, 200), np.uint8)
        cv2.putText(strip, banner, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (120, 0, 0), 1, cv2.LINE_AA)
        sheet = np.vstack([strip, sheet])
    return sheet


def _captioned_row(images: list[tuple[str, np.ndarray]], height: int) -> np.ndarray:
    tiles = []
    for caption, image in images:
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        scaled = resize(rgb, round(rgb.shape[1] * height / rgb.shape[0]), height)
        label = np.full((22, scaled.shape[1], 3), 255, np.uint8)
        cv2.putText(label, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([label, scaled]))
    return np.hstack(tiles)
