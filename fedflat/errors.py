"""Errors a user can act on. The CLI prints them in one line and exits with code 2."""

from __future__ import annotations


class FedflatError(Exception):
    """Base class of errors caused by input (scenario, data, arguments), not by bugs."""


class ScenarioError(FedflatError):
    """A scenario problem, located by file, key path and line (and column)."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        self.column = column  # 1-based, for files read as tables (system traces)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<scenario>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class DataError(FedflatError):
    """A dataset that cannot be found, read or split; ``key`` names the scenario key at fault."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class BudgetExhausted(FedflatError):
    """The next step would exceed the privacy budget."""
