"""Flower reads this file from its working directory (`--conf`, default flowerconfig.py).

It makes plain `celery -A worker flower`, run from the project root or the Docker image's
workdir, require the same login as `macao-ocr flower`: basic auth from
MACAO_OCR_FLOWER_USER / MACAO_OCR_FLOWER_PASSWORD, unless Flower's own FLOWER_BASIC_AUTH or
FLOWER_AUTH is set or --basic-auth/--auth is on the command line (Flower's conventions win:
its env options are applied before this file, and the command line after it).
"""

import os
import sys

_user = os.environ.get("MACAO_OCR_FLOWER_USER", "admin")
_password = os.environ.get("MACAO_OCR_FLOWER_PASSWORD")

# This host only, unless FLOWER_ADDRESS or --address (applied after this file) says otherwise.
if not os.environ.get("FLOWER_ADDRESS"):
    address = "127.0.0.1"

_on_command_line = any(a.startswith(("--basic-auth", "--basic_auth", "--auth")) for a in sys.argv)

if not (_on_command_line or os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")):
    if not _password:
        raise SystemExit(
            "Flower needs a login: set MACAO_OCR_FLOWER_PASSWORD (or Flower's FLOWER_BASIC_AUTH)"
        )
    basic_auth = [f"{_user}:{_password}"]
