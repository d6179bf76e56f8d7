"""mmpog-bots' switches reach every role: the in-process bots (Params) and, for --loss-mode iptables,
the child run inside the namespace (its argv)."""
from tools.mmpog_experiment import _child_argv, build_parser, params_from_args


def test_no_redundancy_reaches_the_bots_and_the_namespace_child():
    args = build_parser().parse_args(["--players", "4", "--no-redundancy", "--no-gc-freeze"])
    assert params_from_args(args).redundancy is False
    child = _child_argv(args, 7400)
    assert "--no-redundancy" in child and "--no-gc-freeze" in child
    assert params_from_args(build_parser().parse_args(child)).redundancy is False


def test_redundancy_is_on_by_default():
    args = build_parser().parse_args(["--players", "4"])
    assert params_from_args(args).redundancy is True
    assert "--no-redundancy" not in _child_argv(args, 7400)
