"""The imaging modalities a collection's concepts name, by concept id (UMLS CUIs, as ROCO's are).

One list serves two readers: the eval's zero-shot modality choice classifies images among these
classes, and the search page offers them as filters. Both name a modality the same way, so a page
filter and a report row called "CT" mean the same concept.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModalityClass:
    label: str
    concept_id: str


DEFAULT_MODALITIES: tuple[ModalityClass, ...] = (
    ModalityClass("CT", "C0040405"),
    ModalityClass("MRI", "C0024485"),
    ModalityClass("ultrasound", "C0041618"),
    ModalityClass("plain x-ray", "C1306645"),
    ModalityClass("angiogram", "C0002978"),
    ModalityClass("PET", "C0032743"),
)
