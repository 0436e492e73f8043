"""Every file pydicom ships for its own tests (only those present locally) decodes to pydicom's
pixels or is refused honestly; see tests/dicom_corpus.py for the rules."""

from __future__ import annotations

import os

import pytest
from dicom_corpus import check, corpus_files

FILES = corpus_files()


def test_the_corpus_is_there() -> None:
    assert len(FILES) > 100  # pydicom's wheel ships ~190 test files; none is downloaded


@pytest.mark.timeout(20)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_corpus_file_decodes_like_pydicom_or_is_refused_honestly(path: str) -> None:
    outcome = check(path)
    if outcome.kind == "unverified":  # visible, not silent: install the dicom extra to compare
        pytest.skip(outcome.detail)
    assert outcome.kind in ("decoded", "refused"), outcome.detail
