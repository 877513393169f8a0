"""The demos end to end: `make demo` (real base + zoo) and the self-contained tiny demo."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_tiny_demo_runs_and_experts_specialise(tmp_path, capsys):
    from moerge.lab.demo_tiny import main

    main(["--out", str(tmp_path / "demo"), "--steps", "250"])
    out = capsys.readouterr().out
    assert "== 6. merge" in out and "done in" in out
    table = {line.split()[1]: line for line in out.splitlines() if line.strip().startswith("expert ")}
    # each expert solves its own task far better than the others do
    for task, col in (("reverse", 0), ("sort", 1), ("increment", 2)):
        accs = [int(x.rstrip("%")) for x in table[task].split()[2:]]
        assert accs[col] >= 80 and all(a <= 20 for i, a in enumerate(accs) if i != col), table[task]
    assert (tmp_path / "demo" / "library" / "library.json").exists()


@pytest.mark.slow
def test_main_demo_routes_rows_to_their_experts(capsys):
    from moerge.lab.demo import main

    main(["--tasks", "reverse_words,date_format,reverse_then_uppercase"])  # GLIDER decides, unseen phrasings
    out = capsys.readouterr().out
    assert "retrieved: reverse_words" in out and "retrieved: date_format" in out
    assert "answer:   '" in out and "✓" in out and "model.explain()" in out
    main(["--tasks", "reverse_words,reverse_then_uppercase", "--explicit"])
    out = capsys.readouterr().out
    assert "experts:  reverse_words 1.00" in out and "experts:  reverse_words 0.50, uppercase 0.50" in out
