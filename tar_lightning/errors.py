"""Errors that the command line reports as a short message instead of a traceback."""


class ConfigError(ValueError):
    """An invalid configuration value or data input; the message names it and the fix."""

    @classmethod
    def from_problems(cls, title: str, problems: list[str]) -> "ConfigError":
        """Build one error that lists every problem on its own line under ``title``."""
        return cls(title + ":\n  " + "\n  ".join(problems))
