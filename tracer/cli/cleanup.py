"""`podtrace cleanup`: removes what killed podtrace runs left behind."""

from __future__ import annotations

import click


@click.command()
def cleanup():
    """Remove what a killed podtrace left behind, and nothing a running one still uses:

    \b
    - tc filters of podtrace (named `podtrace:<direction>:<pid>:<start time>`) whose process
      is gone, and the clsact qdiscs it added, in this namespace and every lab namespace;
    - unfinished trace files (`FILE.part` of `flow --save` / `capture -w`) whose writer is
      gone: what they hold is kept as FILE's name with `.incomplete` before the suffix
      (`trace.parquet` → `trace.incomplete.parquet`, never over an existing file), marked
      incomplete; `podtrace analyze` loads it and says so.

    The owners are recorded under $PODTRACE_STATE_DIR (default /run/podtrace); a process is
    told by its pid and start time, so a reused pid is not mistaken for a running owner.

    \b
    Example:
      sudo podtrace cleanup
    """
    from tracer.errors import require_root
    from tracer.kernel import tc
    from tracer.node import ownership
    from tracer.node.netns import list_names

    require_root("podtrace cleanup")
    removed = [f"removed {r}" for r in tc.cleanup(list_names())]
    if any(not ownership.writer_running(w) for w in ownership.registered_writers()):
        from tracer import tracefile   # pyarrow only when there is a file to salvage

        removed += tracefile.cleanup_writers()
    for r in removed:
        click.echo(r)
    click.echo(f"cleanup: {len(removed)} leftover(s) removed" if removed else "cleanup: nothing left behind")
