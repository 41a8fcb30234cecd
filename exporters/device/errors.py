"""The one user-facing error type of hero-deploy.

It lives in `exporters/` because that package must run on a device without torch or the
training code; `hero_train` and `pipeline` import it from here. The CLI turns it into one
line on stderr and exit code 2; any other exception is a bug.
"""


class HeroError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


def unknown_choice(what: str, value, choices) -> str:
    """The one wording of "unknown X": what was given and every valid choice."""
    return f"unknown {what} {value!r}: choose one of {', '.join(map(str, choices))}"
