"""The Recall@K cut-offs reported unless asked otherwise; the three whose mean is "mean recall".

Its own module (no torch) so the command line can show it as a default without importing torch."""
from __future__ import annotations

DEFAULT_KS = (1, 5, 10)
