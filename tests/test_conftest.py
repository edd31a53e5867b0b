"""The test helpers themselves: a missing fixture file is a skip on a developer's machine, a failure in CI."""
import pytest

import conftest


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_vocabulary_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch, ci, outcome):
    monkeypatch.setattr(conftest, "BPE_VOCAB", tmp_path / "missing.txt.gz")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="CLIP vocabulary"):
        conftest.require_bpe_vocab()
