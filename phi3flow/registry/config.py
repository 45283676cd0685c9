"""register's config: the decision it acts on and the registered model's name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from phi3flow.core import names
from phi3flow.core.config import ConfigError, Inputs, param, parse_bool, run_id_of

CHALLENGER = "challenger"


@dataclass
class RegisterOptions:
    model_name: str = param(names.DEFAULT_REGISTERED_MODEL, "Registered model name.")
    alias: str = param(
        "champion", "Alias the chosen model competes for; a loser is aliased `challenger`."
    )
    allow_unvalidated: bool = param(
        False, "Give the alias even if the gate failed or the champion is better (recorded)."
    )

    def __post_init__(self) -> None:
        self.allow_unvalidated = parse_bool("allow_unvalidated", self.allow_unvalidated)
        for name in ("model_name", "alias"):
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,99}", getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be letters, digits, "
                                  "'_', '-' or '.', starting with a letter or digit.")
        if self.alias == CHALLENGER or re.fullmatch(r"v\d+", self.alias):
            raise ConfigError(f"alias={self.alias!r} is reserved: `{CHALLENGER}` marks losers "
                              "and v<N> names versions.")


@dataclass
class RegisterConfig(Inputs, RegisterOptions):
    evaluate_run_id: str = run_id_of(names.EVALUATE)

