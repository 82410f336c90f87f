"""``hf-fcp plan``: table, JSON schema, assignment, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from hf_fcp.cli import main


@pytest.fixture
def lengths_file(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps([5, 17, 3, 40, 1, 900, 12]))
    return path


def test_table_lists_every_rank(lengths_file, capsys):
    assert main(["plan", "--lengths", str(lengths_file), "--world-size", "3", "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "attn share" in out and "KV in" in out
    assert all(f"\n{r:>5} " in "\n" + out for r in range(3))
    assert "compute imbalance" in out and "rounds" in out


def test_json_has_stats_and_assignment(lengths_file, capsys):
    assert main(["plan", "--lengths", str(lengths_file), "--world-size", "4", "--json", "--assignment"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("compute_imbalance", "memory_imbalance", "comm_bytes", "max_rank_comm_bytes", "rounds",
                "plan_ms", "strategy", "world_size", "block_size", "num_tokens"):
        assert key in data, key
    assert data["num_tokens"] == 978 and data["world_size"] == 4 and len(data["ranks"]) == 4
    held = sorted((s, a, b) for spans in data["ranks"] for s, a, b in spans)
    assert sum(b - a for _, a, b in held) == 978


def test_text_lengths_file_with_comments(tmp_path, capsys):
    path = tmp_path / "lengths.txt"
    path.write_text("# one per line\n100\n\n250  # a comment\n7\n")
    assert main(["plan", "--lengths", str(path), "--world-size", "2", "--json", "--strategy", "ring"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_tokens"] == 357 and data["strategy"] == "ring"


@pytest.mark.parametrize("content, args, message", [
    (None, ["--world-size", "2"], "does not exist"),
    ("[1, 2", ["--world-size", "2"], "is not valid JSON"),
    ("12\nabc\n", ["--world-size", "2"], "line 2: 'abc' is not an integer length"),
    ("", ["--world-size", "2"], "is empty"),
    ("[3, 0]", ["--world-size", "2"], r"seq_lens\[1\]: got 0, expected a positive integer"),
    ("[3, 4]", ["--world-size", "0"], "world_size: got 0, expected a positive integer"),
    ("[3, 4]", ["--world-size", "2", "--block-size", "0"], "block_size: got 0, expected a positive integer"),
    ("[300]", ["--world-size", "2", "--tokens-per-rank", "10"], "tokens_per_rank=10 is too small"),
    ("[300, 10]", ["--world-size", "2", "--tokens-per-rank", "200", "--strategy", "packing"],
     "keeps sequences whole"),
    ("[3, 4]", ["--world-size", "2", "--assignment"], "--assignment needs --json"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, args, message):
    path = tmp_path / "lengths"
    if content is not None:
        path.write_text(content)
    assert main(["plan", "--lengths", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-fcp: error:") and "\n" not in err and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_console_script_unknown_strategy_exits_2_without_traceback(lengths_file):
    proc = subprocess.run([sys.executable, "-m", "hf_fcp.cli", "plan", "--lengths", str(lengths_file),
                           "--world-size", "2", "--strategy", "zigzag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'zigzag'" in proc.stderr and "Traceback" not in proc.stderr
