"""``svdecode logit-bias STEERING_DIR``: the arguments of
:func:`svdecode_pl.integrations.logit_bias.export_logit_bias`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from svdecode_pl.integrations import logit_bias
from svdecode_pl.integrations.logit_bias import (
    CLAMP,
    MAX_ENTRIES,
    as_steering_vector,
    export_logit_bias,
    model_vocab_size,
)
from svdecode_pl.steering.values import STEERING_RULES
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.validation import check_value


def main(args: list[str]) -> None:
    """``svdecode logit-bias STEERING_DIR``: the bias as JSON (``{"logit_bias": {"id": bias}}``)."""
    parser = argparse.ArgumentParser(prog="svdecode logit-bias", description=logit_bias.__doc__.split("\n")[0])
    parser.add_argument("steering", help="steering vector directory (or an artifact with steering/)")
    parser.add_argument("--max-entries", type=int, default=None,
                        help=f"at most this many tokens (default {MAX_ENTRIES}, vLLM's limit; at most the vocabulary)")
    parser.add_argument("--clamp", type=float, default=CLAMP, help="largest absolute bias a server accepts")
    parser.add_argument("--model", help="check the vector's vocabulary against this model (hub id or path)")
    parser.add_argument("--mu", type=float, help="override the vector's strength")
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--as-steering", type=Path, metavar="DIR",
                        help="also write the bias as a static steering vector (direction = bias / mu) into DIR, "
                             "for `svdecode test` to score what a server would apply")
    opts = parser.parse_args(args)
    for option, name in (("--mu", "mu"), ("--clamp", "clamp"), ("--max-entries", "max_entries")):
        check_value(option, getattr(opts, name), STEERING_RULES[name])
    path = Path(opts.steering)
    if not (path / "steering_vector.json").exists() and (path / "steering" / "steering_vector.json").exists():
        path = path / "steering"
    vector = SteeringVector.load(path)
    if opts.mu is not None:
        vector = vector.with_mu(opts.mu)
    if opts.model:
        vector.check_compatible(model_vocab_size(opts.model), None, source=str(path / "steering_vector.json"))
    result = export_logit_bias(vector, opts.max_entries, opts.clamp)
    if opts.as_steering:
        as_steering_vector(vector, result).save(opts.as_steering)
    text = json.dumps({"logit_bias": {str(k): round(v, 6) for k, v in result.bias.items()}}, allow_nan=False)
    if opts.output:
        opts.output.write_text(text + "\n")
    else:
        print(text)
    print(result.summary(), file=sys.stderr)
