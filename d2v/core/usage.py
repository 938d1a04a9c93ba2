"""The command class of every d2v command: typer writes a required argument as `{name}` on the usage line; d2v
writes it as click and most tools do, in capitals (`d2v probe [OPTIONS] ENCODER`)."""
from __future__ import annotations

import re

from typer.core import TyperCommand


class PlainUsage(TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), p) for p in pieces]
