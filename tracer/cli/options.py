"""Options several commands share, spelled once: the lab's --prefix, --ip-family."""

from __future__ import annotations

import click

from tracer import settings

PREFIX_HELP = "Name prefix of the lab's namespaces (env PODTRACE_LAB_PREFIX; the option wins)."


def prefix_default() -> str:
    """The effective lab prefix as --help shows it: the environment's value, or the default."""
    source = settings.lab_prefix_source()
    return settings.lab_prefix() + ("" if source == "default" else f", from {source}")


class PrefixOption(click.Option):
    """--prefix NAME: its default read when asked for (the environment of this run, not of
    the import), and shown as such in --help."""

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        return record and (record[0], f"{record[1]}  [default: {prefix_default()}]")


def prefix_option(callback=None, help: str = PREFIX_HELP):
    """--prefix NAME for a command that uses the lab. Its value is None when not given:
    the caller reads settings.lab_prefix() then (PODTRACE_LAB_PREFIX, else the default)."""
    return click.option("--prefix", "prefix", cls=PrefixOption, default=None, metavar="NAME",
                        callback=callback, expose_value=callback is None, is_eager=False, help=help)



def share_prefix(group: click.Group) -> click.Group:
    """A command group with a --prefix option (`lab`) takes it after any of its commands too
    (`lab status --prefix mylab` as `lab --prefix mylab status`), and every --prefix of it
    shows the default in effect. A prefix given after the command runs the group's callback
    again with it (which checks it and sets ctx.obj)."""
    def take(ctx: click.Context, _param, value):
        if value and ctx.parent is not None:
            ctx.parent.invoke(group.callback, **dict(ctx.parent.params, prefix=value))
            ctx.obj = ctx.parent.obj
        return value

    for i, p in enumerate(group.params):
        if p.name == "prefix" and not isinstance(p, PrefixOption):
            group.params[i] = PrefixOption(p.opts, default=None, metavar=p.metavar, help=p.help)
    for cmd in group.commands.values():
        if not any(p.name == "prefix" for p in cmd.params):
            cmd.params.append(PrefixOption(["--prefix", "prefix"], default=None, metavar="NAME",
                                           expose_value=False, callback=take, help=PREFIX_HELP))
    return group


def ip_family_option(help: str):
    """--ip-family 4|6 (also ipv4/ipv6): the address family of a dual-stack endpoint.
    Its value is 4, 6 or None (not given)."""
    def to_int(_ctx, _param, value):
        return None if value is None else int(value[-1])

    return click.option("--ip-family", "ip_family", type=click.Choice(["4", "6", "ipv4", "ipv6"], case_sensitive=False),
                        default=None, callback=to_int, metavar="4|6", help=help)
