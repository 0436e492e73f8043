"""One error base for the whole toolkit, and the exit codes the CLI maps it to.

Every failure a user can cause or meet (a bad bundle, an unreadable image, a backend that cannot
run, a batch with failed items) is an `EyecareError`. The CLI catches exactly this base, prints
`error: <message>` on stderr and exits with the error's `exit_code`; anything else is a bug and
keeps its traceback. Domain classes keep their older bases too (`ValueError`, `RuntimeError`) so
code that caught those still does.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ITEMS_FAILED = 3

# exit code -> what it means; ARCHITECTURE.md's table is written from this one.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "the job failed or could not start",
    EXIT_USAGE: "bad usage (options, arguments)",
    EXIT_ITEMS_FAILED: "a batch finished, but some items failed (each recorded)",
}


class EyecareError(Exception):
    """The base of every error the CLI reports as `error: …` (exit 1 unless a subclass says)."""

    exit_code: int = EXIT_FAILED


class EyecareUsageError(EyecareError, ValueError):
    """The caller asked for something that cannot be: a bad option value, a missing argument."""

    exit_code = EXIT_USAGE


class ItemsFailed(EyecareError):
    """A batch ran to its end but some items failed; each failure is already recorded."""

    exit_code = EXIT_ITEMS_FAILED

    def __init__(self, failed: int, total: int, where: str = "", what: str = "items") -> None:
        self.failed, self.total = failed, total
        tail = f" (see {where})" if where else ""
        super().__init__(f"{failed} of {total} {what} failed{tail}")
