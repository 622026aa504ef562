"""Progress bars written to a log file (not a terminal) redraw rarely, instead of ten times a second."""

from __future__ import annotations

import os
import subprocess
import sys

BAR = ("import time\nfrom tqdm.auto import tqdm\n"
       "for _ in tqdm(range(40), desc='work'):\n    time.sleep(0.02)\n")


def _redraws(code: str, **env: str) -> int:
    """How many times a bar was drawn on stderr (a pipe here, as in a log file)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")} | env
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stderr.count("work:")


def test_a_bar_off_a_terminal_is_drawn_only_at_start_and_end():
    quiet = "from pixelvote.cli import quiet_progress_off_terminal\nquiet_progress_off_terminal()\n"
    assert _redraws(BAR) > 3  # tqdm's own default: a redraw every 0.1 s over the 0.8 s of work
    assert _redraws(quiet + BAR) == 2


def test_the_users_own_setting_wins():
    quiet = "from pixelvote.cli import quiet_progress_off_terminal\nquiet_progress_off_terminal()\n"
    assert _redraws(quiet + BAR, TQDM_MININTERVAL="0.1") > 3
    assert _redraws(quiet + BAR, TQDM_DISABLE="1") == 0


def test_the_command_sets_it_before_any_bar_exists():
    code = ("import os, sys\nfrom pixelvote import cli\nsys.argv = ['pixelvote', 'models']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('interval', os.environ.get('TQDM_MININTERVAL'), 'tqdm' in sys.modules)")
    full = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert res.stdout.strip().splitlines()[-1].startswith("interval 30 ")
    # importing the CLI must not import tqdm: its defaults are read from the environment on import
    pre = subprocess.run([sys.executable, "-c", "import sys, pixelvote.cli; print('tqdm' in sys.modules)"],
                         capture_output=True, text=True, env=full, timeout=120)
    assert pre.stdout.strip() == "False"
