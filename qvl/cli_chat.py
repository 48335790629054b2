"""`qvl chat`: an interactive conversation with images and videos in the terminal.

Commands: /image PATH, /video PATH (attached to the next message), /reset (history and attachments),
/quit. An attachment's header is read when it is attached, so a bad file is reported once and never
attached; a turn that still fails drops its attachments, so it never jams the next turns. In a terminal:
readline line editing and history (~/.qvl_history), and Ctrl-C at the prompt asks before quitting (Ctrl-C
while a reply streams stops that reply). Through a pipe: plain lines, no prompt. The flags, the model and
the sampling are qvl.cli's (it calls `chat`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from typing import Callable


def _enable_line_editing() -> None:
    """readline for input(): arrow keys, Ctrl-R, and the history of earlier sessions (~/.qvl_history)."""
    try:
        import atexit
        import readline
    except ImportError:                           # no readline on this platform: plain input()
        return
    history = Path.home() / ".qvl_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, history))


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def _confirm_quit() -> bool:
    """Ctrl-C at an empty prompt: ask first (a second Ctrl-C or EOF also quits)."""
    try:
        return input("\nquit? [y/N] ").strip().lower() in ("y", "yes")
    except (KeyboardInterrupt, EOFError):
        return True


def _check_attachment(llm, part: dict) -> None:
    """Read the attachment's header now, so a bad file is reported once and never attached."""
    if llm.engine.processor is not None:
        llm.engine.processor.count_tokens([{"role": "user", "content": [part]}],
                                          max_model_len=llm.engine.max_model_len)


def chat(llm, params, attach: Callable[[str, str], dict]) -> int:
    """`qvl chat` over a qvl.LLM with these SamplingParams; attach(kind, source) -> the message part, or
    ValueError (see the module docstring)."""
    history: list[dict] = []
    pending: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    print("qvl chat — /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            if not interactive or _confirm_quit():
                print(file=sys.stderr)
                break
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, pending = [], []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith(("/image ", "/video ")):
            kind, source = line[1:6], line[7:].strip()
            try:
                part = attach(kind, source)
                _check_attachment(llm, part)
            except ValueError as e:
                print(f"qvl: error: {e} (not attached)", file=sys.stderr)
                continue
            pending.append(part)
            print(f"({kind} attached: {source})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"qvl: unknown command {line.split()[0]} (try /image, /video, /reset, /quit)", file=sys.stderr)
            continue
        user = {"role": "user", "content": pending + [{"type": "text", "text": line}]}
        reply = ""
        try:
            for delta, _ in llm.stream_chat(history + [user], params):
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:
            dropped = f" ({len(pending)} attachment(s) dropped)" if pending else ""
            print(f"qvl: error: {e}{dropped}", file=sys.stderr)
            pending = []                      # a failed turn never jams the next ones
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [user, {"role": "assistant", "content": reply}]
        pending = []
    return 0
