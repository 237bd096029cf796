"""Reading the PDFs that the figure commands write: font objects, font sizes of the text operators, page size."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest


def pdf_objects(data: bytes) -> list[bytes]:
    return re.findall(rb"\d+ 0 obj(.*?)endobj", data, flags=re.S)


def pdf_fonts(data: bytes) -> list[dict[str, str]]:
    """/Subtype and /BaseFont of every /Type /Font object of the PDF."""
    fonts = []
    for obj in pdf_objects(data):
        head = obj.split(b"stream", 1)[0]
        if re.search(rb"/Type\s*/Font\b", head):
            subtype = re.search(rb"/Subtype\s*/(\w+)", head)
            base = re.search(rb"/BaseFont\s*/([\w+-]+)", head)
            fonts.append({"subtype": subtype.group(1).decode() if subtype else "", "base": base.group(1).decode()
                          if base else ""})  # fmt: skip
    return fonts


def pdf_font_sizes(data: bytes) -> list[float]:
    """Font sizes of every text-showing operator (``/F1 8 Tf``) in the PDF's (deflated) content streams."""
    sizes = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, flags=re.S):
        try:
            text = zlib.decompress(stream)
        except zlib.error:
            text = stream
        sizes += [float(x) for x in re.findall(rb"/F[\w-]*\s+([\d.]+)\s+Tf", text)]
    return sizes


def pdf_width_inches(data: bytes) -> float:
    box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    return float(box.group(1)) / 72.0


def check_paper_pdf(path: Path, width_in: float) -> None:
    data = path.read_bytes()
    fonts = pdf_fonts(data)
    assert fonts, "the PDF has no font objects"
    assert all(f["subtype"] != "Type3" for f in fonts), fonts
    assert {f["subtype"] for f in fonts} <= {"TrueType", "Type0", "CIDFontType2"}, fonts
    assert b"/FontFile2" in data  # the TrueType program is embedded
    sizes = pdf_font_sizes(data)
    assert sizes and min(sizes) >= 8.0, sorted(set(sizes))
    assert pdf_width_inches(data) == pytest.approx(width_in, abs=0.01)
