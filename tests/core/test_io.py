"""core/io's one-line error text, which the CLI, the tune side and the doctor all print."""

from oelm_ray.core.io import one_line


def test_an_error_is_one_line_cut_at_its_limit():
    e = RuntimeError("first line\n  second\tline  " + "x" * 300)
    assert one_line(e) == ("first line second line " + "x" * 300)[:200]
    assert one_line(e, 20, typed=True) == "RuntimeError: first line second li"
    assert one_line(e, None).endswith("x" * 300)
    assert one_line(ValueError()) == one_line(ValueError(" \n"), typed=True) == "ValueError"
