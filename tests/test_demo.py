"""The demo (`make demo`) end to end, with fewer training steps: it must train, route and report."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_runs_and_experts_specialise(tmp_path, capsys):
    from moerge.demo import main

    main(["--out", str(tmp_path / "demo"), "--steps", "250"])
    out = capsys.readouterr().out
    assert "== 6. merge" in out and "done in" in out
    table = {line.split()[1]: line for line in out.splitlines() if line.strip().startswith("expert ")}
    # each expert solves its own task far better than the others do
    for task, col in (("reverse", 0), ("sort", 1), ("increment", 2)):
        accs = [int(x.rstrip("%")) for x in table[task].split()[2:]]
        assert accs[col] >= 80 and all(a <= 20 for i, a in enumerate(accs) if i != col), table[task]
    assert (tmp_path / "demo" / "library" / "library.json").exists()
