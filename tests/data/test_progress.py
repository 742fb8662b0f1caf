"""Preparation progress when piped: plain lines (LineProgress's), every 5 % of a known input, with an ETA."""

from __future__ import annotations

import re

from scalesparse.data.progress import UNKNOWN_EVERY, PrepProgress


def test_plain_lines_every_5_percent_of_the_input_with_rates_and_time_left():
    lines: list[str] = []
    p = PrepProgress(1_000_000, terminal=False, quiet_s=0, out=lines.append)
    for i in range(1, 11):  # 10 % of the input per update
        p.update(docs=100, chars=90_000, tokens=25_000, done_bytes=i * 100_000)
    p.close()
    assert len(lines) == 11  # one per update (each crosses a 5 % mark), and the last
    assert re.match(r"data: 10% of 1\.0 MB read, 0\.1 MB of text, 25,000 tokens \| [\d.,]+ MB/s, 100 docs, "
                    r"[\d,]+ docs/s, [\d.]+ M tok/s \| 0:\d\d elapsed, 0:\d\d left$", lines[0])  # fmt: skip
    assert "100% of 1.0 MB read" in lines[-2] and "1,000 docs" in lines[-1] and lines[-1].endswith("elapsed, done")


def test_without_a_known_input_size_lines_count_text_and_say_no_eta():
    lines: list[str] = []
    p = PrepProgress(None, terminal=False, quiet_s=0, out=lines.append)
    p.update(docs=10, chars=UNKNOWN_EVERY + 1, tokens=5, done_bytes=0)
    p.close()
    assert len(lines) == 2 and "read" not in lines[0] and "left" not in lines[0]


def test_a_quick_preparation_says_nothing():
    lines: list[str] = []
    p = PrepProgress(1000, terminal=False, quiet_s=60, out=lines.append)
    p.update(docs=1, chars=1000, tokens=300, done_bytes=1000)
    p.close()
    assert lines == []
