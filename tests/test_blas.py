"""ensure_fast_blas re-executes with OpenBLAS preloaded, once, keeping the command line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from models.backend import NO_REEXEC_ENV, OPENBLAS, has_gpu

CHILD = (
    "import json, os, sys; from models.backend import ensure_fast_blas; ensure_fast_blas(); "
    "maps = open('/proc/self/maps').read(); "
    "print(json.dumps([os.environ.get('LD_PRELOAD'), sys.argv[1:], "
    "'openblas-pthread/libblas.so.3' in maps]))"
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isfile(OPENBLAS) or has_gpu(),
    reason=f"re-exec only happens on Linux CPU with {OPENBLAS} installed",
)


def _run(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", NO_REEXEC_ENV)}
    env.update(env_overrides)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "a b", "--flag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_reexec_preloads_openblas():
    assert _run() == [OPENBLAS, ["a b", "--flag"], True]


def test_existing_preload_is_kept_after_openblas():
    other = os.path.join(os.path.dirname(OPENBLAS), "libopenblas.so.0")
    assert _run(LD_PRELOAD=other)[0] == f"{OPENBLAS}:{other}"


def test_no_reexec_when_already_preloaded_or_disabled():
    assert _run(LD_PRELOAD=OPENBLAS) == [OPENBLAS, ["a b", "--flag"], True]
    assert _run(**{NO_REEXEC_ENV: "1"}) == [None, ["a b", "--flag"], False]
