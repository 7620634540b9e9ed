"""The ``fixq`` command: parse (:mod:`fixq.app.parser`), dispatch (:mod:`fixq.app.commands`) and turn
errors into one line and an exit code.

Exit codes: 0 success, 2 bad usage or input (one line, with a hint), 1 internal error.
"""
from __future__ import annotations

import sys

from fixq.errors import FixqError, os_error_reason
from . import commands
from .paper import apply_paper
from .parser import build_parser, explicit_options

__all__ = ["main"]

ERROR_HINTS = {
    "ModelError": "see `fixq models`",
    "DataError": "folders must hold DIR/<class>/<image> files",
    "PlanError": "see `fixq quantize --help`",
    "CaptureError": "see README 'Bring your own model'",
    "UnsupportedOpError": "see README 'Bring your own model'",
    "CalibrationError": "check the weights, the data and the preprocessing",
    "ReportError": "fixq report DIR wants a --out folder of quantize or sweep",
    "EngineError": "the integer engine and C export need power-of-two formats everywhere",
    "MixedError": "see `fixq mixed --help`",
    "KMeansError": "see `fixq kmeans --help`",
    "OnnxImportError": "see README 'ONNX in / ONNX out'",
    "QDQError": "see README 'ONNX in / ONNX out'",
}


def _hint(e: BaseException) -> str:
    h = getattr(e, "hint", None)
    return ERROR_HINTS.get(type(e).__name__, "") if h is None else h


def _os_error_line(e: OSError) -> str:
    """One line for a file-system problem on a path the user gave (--out, --plan...)."""
    return f"cannot use {e.filename}: {os_error_reason(e)}"


def _clean_warnings():
    """Library warnings as one line each on stderr: ``fixq: warning: ...`` (no source lines)."""
    import warnings
    old = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        return f"fixq: warning: {message}\n"
    warnings.formatwarning = fmt
    return lambda: setattr(warnings, "formatwarning", old)


def _bug(e: Exception) -> int:
    import os
    import traceback
    if os.environ.get("FIXQ_DEBUG"):
        traceback.print_exc()
    print(f"fixq: internal error: {type(e).__name__}: {e} - this is a bug in fixq; please report it "
          "(set FIXQ_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on a closed pipe."""
    import os
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one ``fixq`` command; returns the exit code (0 ok, 2 user problem, 1 bug in fixq,
    141 when the reader of stdout went away, as a shell reports SIGPIPE: ``fixq ... | head``).

    >>> main(["models", "--json"])  # doctest: +SKIP
    0
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # stdout's reader went away: stop quietly (what was not printed is lost)
        _quiet_stdout()
        return 141


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse prints its own message; usage errors are code 2
        return int(e.code or 0)
    restore = _clean_warnings()
    try:
        args.paper_info = None
        if getattr(args, "paper", False):
            args.paper_info = apply_paper(args, args.command, explicit_options(sys.argv[1:] if argv is None else argv))
        return commands.dispatch(args) or 0
    except FixqError as e:
        hint = _hint(e)
        print(f"fixq: error: {e}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
        return 2
    except BrokenPipeError:  # main() answers it (141)
        raise
    except OSError as e:  # FileNotFoundError, PermissionError, NotADirectoryError, EROFS... on a named path
        if e.filename is None:
            return _bug(e)
        print(f"fixq: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fixq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in fixq: short message, traceback only on request
        return _bug(e)
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
