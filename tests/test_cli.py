"""The command line's options are made from JobConfig and AgentConfig: none forgotten, defaults and values
carried exactly, `train` and `plan` alike, bad values refused by argparse, test knobs kept apart."""
from dataclasses import fields

import pytest

from peer.cli import build_parser, main, plan
from peer.cli.agent import AgentConfig
from peer.cli.options import TESTING, flag, job_config, values
from pipeline.config import JobConfig


def subparser(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


def options(name) -> dict:
    """{flag: argparse action} of a subcommand."""
    return {s: a for a in subparser(name)._actions for s in a.option_strings}


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_every_job_config_field_is_a_train_option():
    train = options("train")
    missing = [f.name for f in fields(JobConfig) if flag(f.name) not in train]
    assert missing == []
    assert "--model-options" in train


def test_no_flags_give_the_default_job_config():
    assert job_config(parse("train")) == JobConfig()
    assert job_config(parse("plan"), plan.JOB_FIELDS) == JobConfig()


def test_every_flag_reaches_the_job_config():
    args = parse("train", "--model", "cnn", "--model-options", "width=8,name2=x", "--seed", "3", "--epochs", "2",
                 "--batch-size", "16", "--microbatches", "4", "--optimizer", "adam", "--lr", "0.1",
                 "--momentum", "0.5", "--weight-decay", "0.01", "--shuffle", "off", "--scheme", "fast-async",
                 "--pipeline", "1f1b", "--max-staleness", "2", "--backward-at", "1:2,2:0", "--split", "even",
                 "--recv-timeout", "30", "--wire-dtype", "bfloat16", "--compress", "int8")
    assert job_config(args) == JobConfig(
        model={"name": "cnn", "width": 8, "name2": "x"}, seed=3, epochs=2, batch_size=16, microbatches=4,
        optimizer="adam", lr=0.1, momentum=0.5, weight_decay=0.01, shuffle=False, scheme="fast-async",
        pipeline="1f1b", max_staleness=2, backward_at=[[1, 2], [2, 0]], split="even", recv_timeout=30.0,
        wire_dtype="bfloat16", compress="int8")
    assert job_config(parse("train", "--scheme", "fast-async", "--backward-at", "auto")).backward_at == "auto"
    assert job_config(parse("train", "--shuffle", "on")).shuffle is True


def test_plan_takes_its_job_options_from_the_same_generator_as_train():
    train, planner = options("train"), options("plan")
    flags = ["--model", "--model-options"] + [flag(n) for n in plan.JOB_FIELDS if n != "model"]
    for f in flags:
        a, b = train[f], planner[f]
        assert (a.default, a.type, a.choices, a.help, a.metavar) == (b.default, b.type, b.choices, b.help, b.metavar)
    argv = ["--model-options", "depth=3", "--batch-size", "8", "--microbatches", "2", "--optimizer", "adam",
            "--scheme", "fast-async", "--max-staleness", "0", "--backward-at", "1:0", "--split", "even"]
    assert job_config(parse("plan", *argv), plan.JOB_FIELDS) == job_config(parse("train", *argv))
    assert {f.name for f in fields(JobConfig)} >= set(plan.JOB_FIELDS)


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--scheme", "gossip"], "argument --scheme: invalid choice: 'gossip'"),
    (["--wire-dtype", "float8"], "argument --wire-dtype: invalid choice: 'float8'"),
    (["--shuffle", "yes"], "argument --shuffle: expected on or off, got 'yes'"),
    (["--backward-at", "1-2"], "argument --backward-at: expected STAGE:HOST pairs of chain positions, got '1-2'"),
])
def test_bad_values_are_argparse_errors(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        parse("train", *argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_values_argparse_cannot_check_are_refused_by_the_job_config_before_any_peer_is_asked(capsys):
    assert main(["train", "--peer", "http://127.0.0.1:9", "--epochs", "0"]) == 2
    assert "splitring train: epochs must be >= 1" in capsys.readouterr().err


def test_agent_options_are_agent_config_fields_with_its_defaults():
    agent = options("agent")
    assert all(flag(f.name) in agent for f in fields(AgentConfig))
    cfg = AgentConfig(**values(parse("agent", "--state-dir", "s"), AgentConfig))
    assert cfg == AgentConfig(state_dir="s")
    cfg = AgentConfig(**values(parse("agent", "--state-dir", "s", "--join", "a:1", "--join", "b:2", "--no-mdns",
                                     "--busy-poll", "--port", "0"), AgentConfig))
    assert (cfg.join, cfg.no_mdns, cfg.busy_poll, cfg.port) == (["a:1", "b:2"], True, True, 0)
    with pytest.raises(SystemExit):
        parse("agent")   # --state-dir is required


def test_agent_help_lists_test_knobs_last_and_only_under_testing(capsys):
    with pytest.raises(SystemExit):
        parse("agent", "--help")
    text = capsys.readouterr().out
    user, _, testing = text.partition(f"\n{TESTING}:\n")
    user = user.split("\noptions:\n")[1]   # not the usage line, which lists every flag
    knobs = [flag(f.name) for f in fields(AgentConfig) if f.metadata.get("testing")]
    assert knobs == ["--compute-slowdown"]
    assert all(k in testing and k not in user for k in knobs)
    assert "\n\n" not in testing.strip()   # the last section
    for cmd in ("train", "plan"):
        assert TESTING not in subparser(cmd).format_help()
