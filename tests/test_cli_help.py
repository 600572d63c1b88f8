"""Every command's --help gives every option a description, shows its default the click way, and
marks what is required; -k/--k are the same option wherever K is asked for."""
from __future__ import annotations

import click
from click.testing import CliRunner

from medembed.cli import main


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")


def test_every_option_has_a_description_and_shows_its_default():
    problems = []
    for path, cmd in _commands(main):
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or p.name == "help":
                continue
            flag = p.opts[-1]
            if not (p.help or "").strip():
                problems.append(f"{path} {flag}: no description")
            has_default = p.default is not None and not p.is_flag and not p.multiple and not p.required
            if has_default and not p.show_default:
                problems.append(f"{path} {flag}: default {p.default!r} not shown")
    assert not problems, "\n".join(problems)


def test_help_renders_defaults_and_required_marks():
    runner = CliRunner()
    for path, _ in _commands(main):
        res = runner.invoke(main, [*path.split(), "--help"])
        assert res.exit_code == 0, (path, res.output)
    adapt_help = runner.invoke(main, ["adapt", "--help"]).output
    assert "[default: 30;" in adapt_help and "[required]" in adapt_help
    eval_help = runner.invoke(main, ["eval", "--help"]).output
    assert "-k, --k" in eval_help and "[required]" in eval_help
    assert "-k, --k" in runner.invoke(main, ["search", "--help"]).output


def test_version():
    from medembed import __version__

    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
