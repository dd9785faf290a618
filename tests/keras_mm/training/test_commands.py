"""`kmm export`'s version numbering (TF Serving's layout: one integer folder per version)."""

from keras_mm.training.commands import next_version


def test_next_version(tmp_path):
    base = tmp_path / "siglip_digits"
    assert next_version(str(base)) == 1                       # no folder yet
    base.mkdir()
    assert next_version(str(base)) == 1                       # an empty one
    for name in ("1", "2", "10", "tmp-3", "notes"):
        (base / name).mkdir()
    assert next_version(str(base)) == 11                      # the largest integer + 1, not 3
    (base / "12").write_text("a stray file named like a version")
    assert next_version(str(base)) == 13
