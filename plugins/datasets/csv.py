"""Your own image-caption pairs, listed in a CSV file (one row per image), for image-text pre-training.

A CSV is the common export of captioned image collections (CC3M/LAION-style metadata, a spreadsheet).
It provides ``image`` and ``text``, and ``label`` when ``label_column`` names a column: only then are
label-aware samplers and evaluators (``zs``, ``knn``) accepted by ``orch queue``.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import UserError
from plugins.datasets import csv_rows
from plugins.datasets.imagefolder import ImageFiles, verify_images

TEMPLATES = ("a photo of a {}.",)  # CLIP's default prompt


class CSVPairs:
    """Image-caption pairs from a CSV (image path and caption columns); the last rows are held out.

    ``path`` is the CSV; ``image_column`` holds image paths (relative ones are read from the CSV's folder)
    and ``caption_column`` their captions. The held-out ``test`` split is the last ``test_fraction`` of
    the rows, whatever the seed. ``label_column``, if given, adds an integer ``label`` (the index of the
    value among the sorted distinct values, also ``class_names``, prompted with CLIP's "a photo of a {}.").
    Images become RGB ``image_size`` squares (resize, centre crop).
    """

    def __init__(self, path: Path, image_column: str = "image", caption_column: str = "caption",
                 label_column: str | None = None, test_fraction: float = 0.2, image_size: int = 64):
        path = Path(path)
        rows = csv_rows(path, image_column, caption_column, label_column)
        if len(rows) < 2:
            raise UserError(f"csv: {path} has 1 row; it needs at least 2, one to train on and one to hold out")
        files = [image for image, _, _ in rows]
        verify_images(files, lambda i: f"csv (line {i + 2} of {path})")
        captions = [text for _, text, _ in rows]
        labels = None
        if label_column:
            self.class_names = sorted({label for _, _, label in rows})
            self.templates = list(TEMPLATES)
            index = {name: i for i, name in enumerate(self.class_names)}
            labels = [index[label] for _, _, label in rows]
        n = len(rows)
        k = min(max(round(n * test_fraction), 1), n - 1)
        self.train, self.test = (
            ImageFiles(files[part], captions[part], None if labels is None else labels[part], image_size, "csv")
            for part in (slice(0, n - k), slice(n - k, n))
        )
