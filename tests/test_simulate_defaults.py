"""``hf-fcp simulate`` defaults to the cluster preset of the README's tables (h200) and says so in --help."""

from __future__ import annotations

from hf_fcp.cli import build_parser


def test_simulate_defaults_to_h200_and_says_so(capsys):
    parser = build_parser()
    assert parser.parse_args(["simulate"]).cluster == "h200"
    try:
        parser.parse_args(["simulate", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default h200" in help_text and "README" in help_text
