"""pytest plugin of tests/asan-check: each sanitizer report file is named
after the test during which its process started, e.g.

    build/asan/reports/tests_integration_test_gateway.py__test_pop3.asan.4242

(log_path=DIR/NAME.asan in ASAN_OPTIONS and .ubsan in UBSAN_OPTIONS, set for
the length of each test: the mailshiftd and mailshiftctl processes a test
starts inherit them). Loaded with `pytest -p asan_plugin` only; outside
tests/asan-check, with no log_path in the environment, it does nothing.
"""

import os
import re

import pytest

VARS = (('ASAN_OPTIONS', 'asan'), ('UBSAN_OPTIONS', 'ubsan'))


def _named(options, name, tool):
    """options with log_path's file part replaced by NAME.TOOL."""
    return re.sub(r'(^|:)log_path=([^:]*/)[^/:]*',
                  lambda m: '%slog_path=%s%s.%s' % (m.group(1), m.group(2),
                                                    name, tool),
                  options)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    saved = {var: os.environ.get(var) for var, _ in VARS}
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', item.nodeid)[-120:]
    for var, tool in VARS:
        if saved[var] and 'log_path=' in saved[var]:
            os.environ[var] = _named(saved[var], name, tool)
    try:
        yield
    finally:
        for var, _ in VARS:
            if saved[var] is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = saved[var]
