"""``svdecode push RUN_DIR REPO_ID``: the arguments of :func:`svdecode_pl.integrations.artifact.push_to_hub`."""

from __future__ import annotations

import argparse
import os

from svdecode_pl.integrations.artifact import _network_error, push_to_hub, upload_files
from svdecode_pl.utils.errors import ExternalError, OptionError, one_line


def main(args: list[str]) -> None:
    """``svdecode push RUN_DIR REPO_ID``: upload a run's adapter + steering vector as one Hub repo."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # one line and exit 2, like every other user error
            raise OptionError(f"push: {message} (usage: svdecode push RUN_DIR REPO_ID)")

    parser = Parser(prog="svdecode push", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("run_dir", help="a run directory (<run>/adapter + its steering/) or an artifact directory")
    parser.add_argument("repo_id", help="the Hub repo, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--endpoint", help="another Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--message", default="SVDecode adapter + steering vector", help="the commit message")
    opts = parser.parse_args(args)  # the token comes from HF_TOKEN or `hf auth login`, never the command line
    try:
        validate_repo_id(opts.repo_id)
    except HFValidationError as error:
        raise OptionError(f"push: repo id {opts.repo_id!r}: {one_line(str(error))}") from None
    upload_files(opts.run_dir)
    try:
        url = push_to_hub(opts.run_dir, opts.repo_id, private=opts.private or None, endpoint=opts.endpoint,
                          commit_message=opts.message)
    except OfflineModeIsEnabled:
        raise OptionError("push: HF_HUB_OFFLINE is set; unset it to upload") from None
    except HfHubHTTPError as error:
        raise OptionError(f"push: the Hub refused the upload to {opts.repo_id}: {one_line(str(error))}") from None
    except Exception as error:  # noqa: BLE001 -- the network's own errors (httpx, requests, sockets), by module
        if not _network_error(error):
            raise
        endpoint = opts.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise ExternalError(f"push: cannot reach the Hub at {endpoint} ({type(error).__name__}: "
                            f"{one_line(str(error))}); check the network (or HF_ENDPOINT, --endpoint) and run the "
                            "same command again: nothing was uploaded or changed") from error
    print(url)
